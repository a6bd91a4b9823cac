"""Reference retrieval of the spatial-stereo memory (SSM): which memory frames a clip is given as references.

The rule is the release's (release: src/retrieval_wm.py ``SimpleMemoryBank.retrieval``, ``find_closest_camera_in_view``,
``calculate_fov_overlap``, ``calculate_frustum_volume_overlap``, ``CameraSelector``), computed in float32 as there.
What the scene loop runs is ``retrieve`` (a memory bank's frames for a clip's cameras); ``retrieve_as_release`` is
the rule on cameras alone:

    1. Targets: the request's cameras, or every ``RETRIEVAL_STRIDE``-th of them when there are more than
       ``nframe`` (``retrieval_targets``). Target 0 is the start view and takes nothing; targets 1..T-1 do.
    2. Score of bank frame ``m`` for target ``t``: the IoU of the axis-aligned boxes around the 8 corners of
       the two frustums (rays through the image corners, at ``RELEASE_NEAR`` and ``RELEASE_FAR`` along the
       unit ray, world units) times ``clip(exp((90 - angle) / ANGLE_SCALE_DEG), 0, 1)``, ``angle`` the angle
       in degrees between the optical axes; plus ``SHORTCUT_BONUS`` for the target's shortcut frames
       (``shortcut_bonus``). Each target takes the argmax, the lowest bank index on ties, so every target has
       a reference even when all scores are 0: a clip never goes without one.
    3. ``references`` are the distinct frames in order of first pick, ``ref_index`` the first target
       (``t - 1``) that took each.
    4. More than ``max_refs`` distinct frames: the selector (``select_frames``: quality-aware farthest-point
       sampling over the targets' picks, one entry per target) keeps ``max_refs`` of them, and step 2 runs
       again among the kept frames only (in selection order, no shortcut), which gives the final picks.

A photo's first clip needs no rule of its own: its bank holds the photo alone, at the start camera, so every target
takes it and it serves target 0 with the start camera, which is the release's single-view input (release:
src/data_utils.py ``load_single_view_data``: reference = the image, ``ref_index`` [0], camera ``w2cs[0:1]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from engine.constants import KEYFRAMES, MAX_REFERENCES
from engine.geometry.cameras import Cameras

if TYPE_CHECKING:
    from engine.geometry.memory import MemoryBank


class RetrievalError(ValueError):
    """Cameras or a bank that references cannot be retrieved for; the message is one readable sentence."""


RELEASE_NEAR = 0.1  # frustum corners along the unit corner rays, world units (release: retrieval 815-816)
RELEASE_FAR = 10.0
ANGLE_SCALE_DEG = 36.0  # the release writes the angle factor as exp((90 - angle) / 180 * 5)
SHORTCUT_BONUS = 1.0  # added to a shortcut frame's score (release: find_closest_camera_in_view 374-375)
RETRIEVAL_STRIDE = 4  # camera files longer than nframe are retrieved at every 4th camera (release: retrieval 780-785)
SELECTOR_POSE_WEIGHT = 0.3  # CameraSelector.select as retrieval calls it (release: retrieval 835-836)
SELECTOR_IMAGE_WEIGHT = 0.7
SELECTOR_QUALITY_BIAS = 0.1
SELECTOR_EPS = 1e-8  # the release's guard in each normalisation of the selector
# Shortcut rules (release: retrieval 762-805): which targets take a frame of an earlier trajectory of the same view.
REGULAR_SHORTCUT_TARGETS = (1, 2, 3, 5, 7, 9, 13, 17)  # view*/traj0 and traj1, from the view's traj2
AERIAL_FREE_TARGETS = (4, 8, 12, 16)  # wonder*/target* after traj0, from their traj0: every target but these


@dataclass
class FrameFeatures:
    """What the selector knows of N frames besides their cameras.

    Attributes:
        image: Appearance features (the DINOv2 pooled output in the release); None: pose only. [N, D]
        quality: Image-quality scores. [N]
    """

    image: Optional[np.ndarray]
    quality: np.ndarray


@dataclass
class Retrieval:
    """The release's retrieval of one clip (module doc).

    Attributes:
        targets: Indices of the request's cameras retrieved for (all, or every 4th). [T]
        per_target: Bank index taken by target t = 1..T-1. [T-1]
        references: The distinct bank indices, in order of first pick. [R]
        ref_index: The first target (as t - 1) that took each reference. [R]
        selected: Bank indices the selector kept, in its order; None when at most max_refs were picked. [max_refs]
    """

    targets: list[int]
    per_target: list[int]
    references: list[int]
    ref_index: list[int]
    selected: Optional[list[int]] = None

    def to_json(self) -> dict:
        out = {"targets": self.targets, "per_target": self.per_target, "references": self.references,
               "ref_index": self.ref_index}
        if self.selected is not None:
            out["selected"] = self.selected
        return out


def retrieval_targets(n: int, nframe: int = KEYFRAMES) -> list[int]:
    """Which cameras of an ``n``-camera request are retrieved for.

    Args:
        n: Cameras in the request (camera 0 the start view).
        nframe: The clip's keyframes.

    Returns:
        All indices, or every ``RETRIEVAL_STRIDE``-th when ``n > nframe`` (an official 81-camera file: 0, 4, ...,
        80, its 21 keyframes). [T]
    """
    return list(range(0, n, RETRIEVAL_STRIDE)) if n > nframe else list(range(n))


def _frustum_boxes(cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-aligned boxes around each camera's 8 frustum corners: the rays through the image corners (0,0), (W,0),
    (W,H), (0,H), normalised, at ``RELEASE_NEAR`` and ``RELEASE_FAR``.

    Returns:
        Box corners ``lo``, ``hi``, float32. [N, 3] each
    """
    c2w = torch.linalg.inv(cams.w2c.detach().cpu().float())  # the release inverts in general, not as a rigid map
    k_inv = torch.linalg.inv(cams.K.detach().cpu().float())
    w, h = float(cams.width), float(cams.height)
    pix = torch.tensor([[0.0, 0.0, 1.0], [w, 0.0, 1.0], [w, h, 1.0], [0.0, h, 1.0]])
    rays = pix @ k_inv.transpose(1, 2)  # [N,4,3]
    rays = rays / rays.norm(dim=2, keepdim=True)
    rot, centre = c2w[:, :3, :3].transpose(1, 2), c2w[:, None, :3, 3]
    corners = torch.cat([(rays * RELEASE_NEAR) @ rot + centre, (rays * RELEASE_FAR) @ rot + centre], dim=1)
    return corners.amin(dim=1), corners.amax(dim=1)


def release_scores(targets: Cameras, bank: Cameras) -> torch.Tensor:
    """Frustum-box IoU times the angle factor of every (target, bank frame) pair (module doc, step 2, without
    shortcut bonuses). Each batch's intrinsics are read at its own image size.

    Args:
        targets: Target cameras. [T]
        bank: Cameras of the bank frames. [M]

    Returns:
        Scores in [0, 1], float32. [T, M]
    """
    lo_t, hi_t = _frustum_boxes(targets)
    lo_b, hi_b = _frustum_boxes(bank)
    lo, hi = torch.maximum(lo_t[:, None], lo_b[None]), torch.minimum(hi_t[:, None], hi_b[None])  # [T,M,3]
    inter = (hi - lo).clamp(min=0.0).prod(dim=-1)
    union = (hi_t - lo_t).prod(dim=-1)[:, None] + (hi_b - lo_b).prod(dim=-1)[None] - inter
    iou = torch.where((hi > lo).all(dim=-1), inter / (union + 1e-8), torch.zeros_like(inter))
    axis_t = torch.linalg.inv(targets.w2c.detach().cpu().float())[:, :3, 2]
    axis_b = torch.linalg.inv(bank.w2c.detach().cpu().float())[:, :3, 2]
    angle = torch.rad2deg(torch.acos((axis_t[:, None] * axis_b[None]).sum(dim=-1).clamp(-1.0, 1.0)))
    # (90 - angle) / 180 * 5 in the release's order of operations, so float32 rounds alike.
    return iou * torch.exp((90.0 - angle) / 180.0 * (180.0 / ANGLE_SCALE_DEG)).clamp(0.0, 1.0)


def _argmax_picks(scores: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Per row the first column of largest score (``torch.argmax``, as the release), the distinct columns in order
    of first pick and the row that first took each: ``(per_row, distinct, first_row)``."""
    picks = [int(j) for j in scores.argmax(dim=1).tolist()]
    first: dict[int, int] = {}
    for row, j in enumerate(picks):
        first.setdefault(j, row)
    return picks, list(first), list(first.values())


def shortcut_bonus(view: str, traj: str, bank_labels: Sequence[str], n_targets: int) -> dict[int, set[int]]:
    """The release's shortcut rules (release: src/retrieval_wm.py retrieval 762-805) as the ``bonus`` input of
    ``retrieve_as_release``.

    Args:
        view: The trajectory's group folder (the release's ``view_id``: view0, target_1, wonder0, ...).
        traj: The trajectory's folder (traj0, traj1, ...).
        bank_labels: Where each bank frame came from, ``"<view>/<trajectory>"`` (the release's frame names without
            the frame number; panorama bank views ``"<scene>/pano_bank"``). [M]
        n_targets: T, the number of retrieval targets (``retrieval_targets``).

    Returns:
        Target t -> the bank indices whose score gets ``SHORTCUT_BONUS``.

    The release's tests on the names are kept as they are:

    - ``view`` containing "wonder" or "target", and ``traj > "traj0"`` as strings: the frames of ``<view>/traj0``,
      from its 4th on every other one, serve every target but 4, 8, 12, 16;
    - else ``view`` containing "view" and ``traj`` traj0 or traj1: the frames of ``<view>/traj2``, from the 4th on
      every other one (for traj1: of its first half only), serve targets 1, 2, 3, 5, 7, 9, 13, 17;

    target ``t`` taking frame number ``int(t / T * len(frames))`` of those. Any other trajectory gets none.
    """
    if ("wonder" in view or "target" in view) and traj > "traj0":
        frames = [i for i, name in enumerate(bank_labels) if name.startswith(f"{view}/traj0")][3::2]
        served = [t for t in range(1, n_targets) if t not in AERIAL_FREE_TARGETS]
    elif "view" in view and traj in ("traj0", "traj1"):
        frames = [i for i, name in enumerate(bank_labels) if name.startswith(f"{view}/traj2")]
        frames = (frames if traj == "traj0" else frames[: len(frames) // 2])[3::2]
        served = [t for t in range(1, n_targets) if t in REGULAR_SHORTCUT_TARGETS]
    else:
        return {}
    if not frames:
        return {}
    return {t: {frames[int(t / n_targets * len(frames))]} for t in served}


def _normalise_columns(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / (x.std(axis=0) + SELECTOR_EPS)


def pose_features(w2c: np.ndarray) -> np.ndarray:
    """The selector's camera features (release: ``CameraSelector._extract_camera_features``).

    Args:
        w2c: World-to-camera matrices. [N, 4, 4]

    Returns:
        The camera centre ``-R^T t`` and the w2c rotation's quaternion (x, y, z, w) with w >= 0. [N, 7]
    """
    w2c = np.asarray(w2c)
    rot, t = w2c[:, :3, :3], w2c[:, :3, 3]
    centres = -np.einsum("nji,nj->ni", rot, t)
    quats = Rotation.from_matrix(rot).as_quat()
    quats = np.where(quats[:, 3:4] < 0, -quats, quats)
    return np.concatenate([centres, quats], axis=1)


def select_frames(w2c: np.ndarray, features: FrameFeatures, k: int = MAX_REFERENCES,
                  pose_weight: float = SELECTOR_POSE_WEIGHT, image_weight: float = SELECTOR_IMAGE_WEIGHT,
                  quality_bias: float = SELECTOR_QUALITY_BIAS) -> list[int]:
    """The release's ``CameraSelector.select``: ``k`` of ``N`` frames by quality-aware farthest-point sampling.

    Each feature block is normalised per column (zero mean, unit standard deviation); the points are ``[pose_weight
    * pose_features, image_weight * image]``; quality is min-max normalised to ``q`` in [0, 1]. The first frame
    maximises ``quality_bias * q - |x - mean(x)|``, each next one the distance to the nearest frame chosen so far
    times ``1 + quality_bias * (q - 0.5)`` (first index on ties, never a chosen one).

    Args:
        w2c: World-to-camera matrices. [N, 4, 4]
        features: ``image`` [N, D] or None (pose only: the image block is left out) and ``quality`` [N].
        k: Frames to keep, 1..N.

    Returns:
        Frame indices in selection order. [k]
    """
    w2c = np.asarray(w2c)
    n = w2c.shape[0]
    if not 1 <= k <= n:
        raise RetrievalError(f"The selector keeps 1 to {n} frames here; asked for {k}.")
    blocks = [_normalise_columns(pose_features(w2c)) * pose_weight]
    if features.image is not None:
        image = np.asarray(features.image)
        if image.shape[0] != n:
            raise RetrievalError(f"The selector needs one image feature row per frame ({n}); got {image.shape[0]}.")
        blocks.append(_normalise_columns(image) * image_weight)
    points = np.concatenate(blocks, axis=1)
    quality = np.asarray(features.quality, dtype=np.float64)
    q = (quality - quality.min()) / (quality.max() - quality.min() + SELECTOR_EPS)
    factor = 1.0 + quality_bias * (q - 0.5)
    current = int(np.argmax(quality_bias * q - np.linalg.norm(points - points.mean(axis=0), axis=1)))
    chosen = [current]
    nearest = np.full(n, np.inf)
    for _ in range(k - 1):
        nearest = np.minimum(nearest, np.linalg.norm(points - points[current], axis=1))
        score = nearest * factor
        score[chosen] = -np.inf
        current = int(np.argmax(score))
        chosen.append(current)
    return chosen


def retrieve_as_release(targets: Cameras, bank: Cameras, *, bonus: Optional[Mapping[int, Collection[int]]] = None,
                        frame_features: Optional[Callable[[list[int]], FrameFeatures]] = None,
                        nframe: int = KEYFRAMES, max_refs: int = MAX_REFERENCES) -> Retrieval:
    """The release's retrieval (module doc) for one clip. Every target gets a reference.

    Args:
        targets: The request's cameras, camera 0 the start view. [N]
        bank: Cameras of the memory bank's frames. [M]
        bonus: Target t (1..T-1, T = ``len(retrieval_targets(N, nframe))``) -> bank indices whose score gets
            ``SHORTCUT_BONUS`` (``shortcut_bonus`` gives the release's).
        frame_features: ``bank indices [R] -> FrameFeatures [R]``, called only when more than ``max_refs`` distinct
            frames are picked (``engine.frame_features`` gives DINOv2 features or the pose-only fallback).
        nframe: The clip's keyframes (longer requests are retrieved at every 4th camera).
        max_refs: Most distinct references.

    Returns:
        ``Retrieval``: per_target [T-1], references and ref_index [R], R <= max_refs.
    """
    if len(bank) == 0:
        raise RetrievalError("The memory bank is empty, so there is nothing to retrieve; add the start view first.")
    if isinstance(max_refs, bool) or not isinstance(max_refs, int) or max_refs < 1:
        raise RetrievalError(f"A clip takes at least one reference; max_refs must be a whole number from 1 up, "
                             f"got {max_refs!r:.40}.")
    chosen = retrieval_targets(len(targets), nframe)
    if len(chosen) < 2:
        raise RetrievalError("Retrieval needs at least two cameras: the start view and a target.")
    later = targets[chosen[1:]]
    scores = release_scores(later, bank)  # [T-1, M]
    for t, frames in (bonus or {}).items():
        if not 1 <= t < len(chosen):
            raise RetrievalError(f"A shortcut names target {t}, but the targets are 1 to {len(chosen) - 1}.")
        for m in set(frames):
            if not 0 <= m < len(bank):
                raise RetrievalError(f"A shortcut names bank frame {m}, but the bank holds {len(bank)} frames.")
            scores[t - 1, m] += SHORTCUT_BONUS
    per_target, references, ref_index = _argmax_picks(scores)
    if len(references) <= max_refs:
        return Retrieval(chosen, per_target, references, ref_index)
    if frame_features is None:
        raise RetrievalError(f"{len(references)} references were picked, more than {max_refs}; choosing among them "
                             "needs frame features (engine.frame_features).")
    described = frame_features(references)
    row = {m: i for i, m in enumerate(references)}
    entries = [row[m] for m in per_target]  # the selector sees one entry per target, as the release passes them
    image = None if described.image is None else np.asarray(described.image)[entries]
    w2c = bank.w2c.detach().cpu().float().numpy()[per_target]
    keep = select_frames(w2c, FrameFeatures(image, np.asarray(described.quality)[entries]), max_refs)
    selected = [per_target[e] for e in keep]
    picks, distinct, ref_index = _argmax_picks(release_scores(later, bank[selected]))
    return Retrieval(chosen, [selected[j] for j in picks], [selected[j] for j in distinct], ref_index,
                     selected=selected)


# ---- what the scene loop runs -------------------------------------------------------------------------------------

@dataclass
class References:
    """The memory views given to one clip, in the engine's convention.

    ``images [R,3,H,W]`` in [0,1]; ``ref_index[r] = k``: reference r serves target frame k + 1 (frame 0 is the start
    view, which needs none). ``pointmaps`` world XYZ ``[R,3,H,W]`` (the paper's branch-form memory only).
    """

    images: torch.Tensor
    cameras: Cameras
    ref_index: torch.Tensor
    pointmaps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def retrieve(bank: "MemoryBank", cameras: Cameras, *, bonus: Optional[Mapping[int, Collection[int]]] = None,
             frame_features: Optional[Callable[[torch.Tensor], FrameFeatures]] = None,
             max_refs: int = MAX_REFERENCES) -> tuple[Retrieval, References]:
    """What runs as retrieval for one clip: the release's rule (module doc) over the scene's memory bank.

    Args:
        bank: The scene's ``engine.geometry.memory.MemoryBank`` (its frames, cameras and labels).
        cameras: The clip's keyframe cameras; frame 0 is the start view, frames 1..F-1 the targets (all of them: the
            clip is already at its keyframes, so the release's every-4th-camera rule does not apply). [F]
        bonus: The shortcut rules' bonus (``shortcut_bonus`` over ``bank.labels``), for an official scene's
            trajectory; None for any other.
        frame_features: ``images [R,3,H,W] -> FrameFeatures``, asked only when more than ``max_refs`` distinct frames
            are picked (``engine.frame_features.load_frame_describer``).
        max_refs: Most distinct references (at least 1).

    Returns:
        The retrieval record (bank indices per target, the references in order of first pick, their ``ref_index``)
        and the references' frames and cameras: at least one, at most ``max_refs``.
    """
    if len(bank) == 0:
        raise RetrievalError("The memory bank is empty, so there is nothing to retrieve; add the start view first.")

    def described(indices: list[int]) -> FrameFeatures:
        if frame_features is None:
            raise RetrievalError(f"More than {max_refs} references were picked; choosing among them needs frame "
                                 "features (engine.frame_features).")
        return frame_features(bank.images[indices])

    found = retrieve_as_release(cameras, bank.cameras, bonus=bonus, frame_features=described, nframe=len(cameras),
                                max_refs=max_refs)
    refs = found.references
    return found, References(images=bank.images[refs], cameras=bank.cameras[refs],
                             ref_index=torch.as_tensor(found.ref_index, dtype=torch.long))
