"""Reference retrieval of the spatial-stereo memory (SSM): which memory frames a clip is given as references.

What the scene loop runs is ``retrieve`` (the first function below), with its constants beside it: a photo's first
clip takes the input view alone, every other clip the retrieval rule. The rest of this module is how the rule
measures and chooses: how much of a target camera's view a memory frame covers (frustum overlap), and which
frames serve which targets; and the release's own rule (``retrieve_as_release``), which ``retrieve`` will run
instead once the loop adopts it.

Frustum overlap (``overlap_matrix``)
    ``overlap(a, b, near, far)`` is the fraction of the *volume* of camera ``a``'s frustum between
    depths ``near`` and ``far`` that camera ``b`` also sees (in front of ``b``, between ``near`` and ``far``
    of ``b``'s depth, projecting inside ``b``'s image ``[0,W) x [0,H)``).
    Estimate: a fixed stratified grid of rays through ``a``'s image (cell centres of an ``nx x ny`` grid
    with ``nx/ny ~ W/H``). A pinhole frustum's volume element is ``z^2 dz dx dy`` in normalised image
    coordinates ``x = (u - cx) / fx``, ``y = (v - cy) / fy``, so rays evenly spaced in pixels carry equal
    volume. Along one ray ``X_b(z) = z R d + t`` is linear in ``a``'s depth ``z``, so every condition of ``b``'s frustum is one linear inequality in ``z`` and the visible part of the ray is
    an interval ``[lo, hi]``; its share of the ray's volume is integrated exactly,
    ``(hi^3 - lo^3) / (far^3 - near^3)``.
    Why not sample depths as well: the exact depth integral removes one dimension of sampling error at no
    cost, and the result is deterministic. The remaining error is the image grid's (shrinks as
    ``1/sqrt(samples)`` at the frustum's silhouette edges).

The retrieval rule (``MemoryBank.retrieve``), for target cameras ``t`` and bank frames ``m``:
    1. ``O[t, m] = overlap(target t, bank frame m, near_m, far_m)`` where ``(near_m, far_m)`` is
       frame ``m``'s depth range (5th / 95th percentile of its valid depth): the targets have no depth of
       their own, and the bank frame's depth says where the scene it holds actually is. Overlaps below
       ``min_overlap`` and excluded frames count as 0.
    2. Each target's *preferred* frame: the largest overlap; frames within ``tie_tolerance`` of that best
       overlap count as equally good and the *closest* of them wins, closeness being
       ``|c_t - c_m| / sqrt(near_m * far_m) + angle(axis_t, axis_m)`` (centre distance in units of the
       frame's typical scene depth, plus the angle between optical axes in radians; the angle decides
       between frames that share a centre, like the panorama views). A closer
       camera sees the same surfaces at a similar scale and from a similar side, which is what the
       stitched reference attention can use best.
    3. If the preferred frames are at most ``max_refs`` distinct frames, they are the references.
       Otherwise references are chosen greedily: each step adds the frame that most increases
       ``sum_t max_{r in kept} O[t, r]`` (ties: the frame preferred by more targets, then the closer frame
       in total, then the lower bank index), until ``max_refs`` are kept or nothing adds overlap; every
       target is then reassigned to its preferred frame (rule 2) within the kept set.
    4. ``refs`` are the frames some target uses; each ref's ``ref_index`` is the target it serves with the
       largest overlap (earliest on ties) — the released model places a reference at the time index of
       one target frame — and ``refs`` are ordered by ``ref_index`` then bank index.

The release's rule (``retrieve_as_release``; ``retrieve`` runs it instead of the rule above once the loop adopts
it), as release: src/retrieval_wm.py computes it (``SimpleMemoryBank.retrieval``, ``find_closest_camera_in_view``,
``calculate_fov_overlap``, ``calculate_frustum_volume_overlap``, ``CameraSelector``), in float32 as there:
    1. Targets: the request's cameras, or every ``RETRIEVAL_STRIDE``-th of them when there are more than
       ``nframe`` (``retrieval_targets``). Target 0 is the start view and takes nothing; targets 1..T-1 do.
    2. Score of bank frame ``m`` for target ``t``: the IoU of the axis-aligned boxes around the 8 corners of
       the two frustums (rays through the image corners, at ``RELEASE_NEAR`` and ``RELEASE_FAR`` along the
       unit ray, world units) times ``clip(exp((90 - angle) / ANGLE_SCALE_DEG), 0, 1)``, ``angle`` the angle
       in degrees between the optical axes; plus ``SHORTCUT_BONUS`` for the target's shortcut frames
       (``shortcut_bonus``). Each target takes the argmax, the lowest bank index on ties, so every target has
       a reference even when all scores are 0.
    3. ``references`` are the distinct frames in order of first pick, ``ref_index`` the first target
       (``t - 1``) that took each.
    4. More than ``max_refs`` distinct frames: the selector (``select_frames``: quality-aware farthest-point
       sampling over the targets' picks, one entry per target) keeps ``max_refs`` of them, and step 2 runs
       again among the kept frames only (in selection order, no shortcut), which gives the final picks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from engine.constants import KEYFRAMES, MAX_REFERENCES
from engine.geometry.cameras import Cameras

DEFAULT_SAMPLES = 1024  # rays per target camera in the overlap estimate


class RetrievalError(ValueError):
    """Cameras or depth ranges that overlaps cannot be measured for; the message is one readable sentence."""


# ---- what runs as retrieval ------------------------------------------------------------------------

MIN_OVERLAP = 0.05  # overlaps below this count as none (the rule's step 1)
TIE_TOLERANCE = 0.02  # overlaps this close to a target's best count as equally good; the closest frame wins (step 2)
INPUT_VIEW = 0  # the memory bank's frame of a photo's input view


@dataclass
class References:
    """The memory views given to one clip, in the engine's convention.

    ``images [R,3,H,W]`` in [0,1]; ``ref_index[r] = k``: reference r serves target frame k + 1 (frame 0 is the input
    view, which needs none). ``pointmaps`` world XYZ ``[R,3,H,W]`` (the paper's branch-form memory only).
    """

    images: torch.Tensor
    cameras: Cameras
    ref_index: torch.Tensor
    pointmaps: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def input_view_references(image: torch.Tensor, cameras: Cameras) -> References:
    """The first clip of a photo: the only reference is the input view itself at target camera 0, serving target
    0 (release: ``load_single_view_data``: reference_video = the image, ref_index [0], reference camera
    = w2cs[0:1])."""
    return References(images=image[None], cameras=cameras[0:1], ref_index=torch.tensor([0]))


def retrieve(bank, cameras: Cameras, *, max_refs: int = MAX_REFERENCES,
             input_view: Optional[torch.Tensor] = None) -> tuple["Retrieval", Optional[References]]:
    """What runs as retrieval for one clip: which frames of the memory bank serve it as references.

    Args:
        bank: The scene's ``engine.geometry.memory.MemoryBank``.
        cameras: The clip's cameras; frame 0 is the start view, frames 1..F-1 are the targets. [F]
        max_refs: Most distinct references.
        input_view: The input photo [3,H,W] on a photo's first clip, which the release conditions on the input view
            alone (``input_view_references``: bank frame ``INPUT_VIEW``, at target 0, with the clip's own first
            camera); None for every other clip, which takes the retrieval rule (module doc), overlaps below
            ``MIN_OVERLAP`` counting as none and overlaps within ``TIE_TOLERANCE`` of the best as equally good.

    Returns:
        The retrieval record (bank indices per target, the references, the overlaps) and the references' frames
        (None when no frame serves the clip).
    """
    targets = cameras[1:]
    if input_view is not None:
        return bank.input_view_retrieval(targets, INPUT_VIEW), input_view_references(input_view, cameras)
    found = bank.retrieve(targets, max_refs=max_refs, min_overlap=MIN_OVERLAP, tie_tolerance=TIE_TOLERANCE)
    if not found.refs:
        return found, None
    return found, References(images=bank.images[found.refs], cameras=bank.cameras[found.refs],
                             ref_index=torch.as_tensor(found.ref_index, dtype=torch.long))


# ---- frustum overlap ---------------------------------------------------------------------------------

def _ray_grid(cams: Cameras, samples: int) -> torch.Tensor:
    """Camera-frame directions ``[N,P,3]`` (z = 1) through the cell centres of a stratified image grid."""
    w, h = cams.width, cams.height
    nx = max(1, int(round(math.sqrt(samples * w / h))))
    ny = max(1, int(round(samples / nx)))
    u = (torch.arange(nx, dtype=torch.float64) + 0.5) * (w / nx)
    v = (torch.arange(ny, dtype=torch.float64) + 0.5) * (h / ny)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    uu, vv = uu.reshape(-1), vv.reshape(-1)
    k = cams.K.detach().cpu().double()
    x = (uu[None] - k[:, 0, 2, None]) / k[:, 0, 0, None]
    y = (vv[None] - k[:, 1, 2, None]) / k[:, 1, 1, None]
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def _check_range(near: torch.Tensor, far: torch.Tensor) -> None:
    if not bool(torch.isfinite(near).all() & torch.isfinite(far).all()) or bool((near <= 0).any()) or bool((far <= near).any()):
        raise RetrievalError("Frustum depth range needs 0 < near < far (finite); pass a valid near and far.")


def _frustum_planes(cams: Cameras, near: torch.Tensor, far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame half-spaces ``g . X >= c`` of each frustum slab: rows ``[N,6,3]`` and offsets ``[N,6]``.

    In front between near and far (``z >= near``, ``-z >= -far``) and inside the image: ``u >= 0`` is
    ``fx x + cx z >= 0`` and ``u <= W`` is ``-fx x + (W - cx) z >= 0`` once ``z > 0`` (same for ``v``/``H``).
    """
    k = cams.K.detach().cpu().double()
    fx, fy, cx, cy = k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2]
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    g = torch.stack([
        torch.stack([zero, zero, one], -1),
        torch.stack([zero, zero, -one], -1),
        torch.stack([fx, zero, cx], -1),
        torch.stack([-fx, zero, cams.width - cx], -1),
        torch.stack([zero, fy, cy], -1),
        torch.stack([zero, -fy, cams.height - cy], -1),
    ], dim=1)
    c = torch.stack([near, -far, zero, zero, zero, zero], dim=1)
    return g, c


def _corner_dirs(cams: Cameras) -> torch.Tensor:
    """Camera-frame directions (z = 1) through the four image corners ``[N,4,3]``."""
    k = cams.K.detach().cpu().double()
    u = torch.tensor([0.0, cams.width, 0.0, cams.width], dtype=torch.float64)
    v = torch.tensor([0.0, 0.0, cams.height, cams.height], dtype=torch.float64)
    x = (u[None] - k[:, 0, 2, None]) / k[:, 0, 0, None]
    y = (v[None] - k[:, 1, 2, None]) / k[:, 1, 1, None]
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def _separated(r: torch.Tensor, t: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
               g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[T,M]`` True where all 8 corners of frustum slab A (``dirs [T,4,3]`` at ``near/far [M]``, mapped into
    B's frame by ``X_b = r X_a + t``, ``r [T,M,3,3]``) lie outside one face plane ``g [M,6,3]``, ``c [M,6]`` of
    B: then the convex slabs cannot intersect."""
    rd = torch.einsum("tmij,tcj->tmci", r, dirs)  # [T,M,4,3]
    z = torch.stack([near, far], dim=-1)  # [M,2]
    corners = rd[:, :, None] * z[None, :, :, None, None] + t[:, :, None, None, :]  # [T,M,2,4,3]
    side = torch.einsum("mkj,tmzcj->tmkzc", g, corners) - c[None, :, :, None, None]  # [T,M,6,2,4]
    return (side.flatten(-2) < 0).all(-1).any(-1)


def overlap_matrix(targets: Cameras, others: Cameras, near: Sequence[float], far: Sequence[float],
                   samples: int = DEFAULT_SAMPLES, chunk: int = 1_000_000) -> torch.Tensor:
    """``[T, M]`` float64: ``overlap(targets[t], others[m], near[m], far[m])`` (module doc) for every pair.

    Pairs whose slabs are separated by a face plane of either frustum are 0 without sampling; the rest
    run in float32 (bounds of a ray interval need no more) in chunks of about ``chunk`` ray-constraints.
    """
    near_t = torch.as_tensor(near, dtype=torch.float64).reshape(-1)
    far_t = torch.as_tensor(far, dtype=torch.float64).reshape(-1)
    m = len(others)
    if near_t.numel() != m or far_t.numel() != m:
        raise RetrievalError(f"Need one near and one far per camera ({m}); got {near_t.numel()} and {far_t.numel()}.")
    _check_range(near_t, far_t)
    t_n = len(targets)
    out = torch.zeros(t_n, m, dtype=torch.float64)
    if t_n == 0 or m == 0:
        return out

    ra, ta = targets.R.detach().cpu().double(), targets.t.detach().cpu().double()
    rb, tb = others.R.detach().cpu().double(), others.t.detach().cpu().double()
    r_ab = torch.einsum("mij,tkj->tmik", rb, ra)  # R_b R_a^T: X_b = R_ab X_a + t_ab
    t_ab = tb[None] - torch.einsum("tmij,tj->tmi", r_ab, ta)
    g_b, c_b = _frustum_planes(others, near_t, far_t)

    # Cheap culling with the face planes of both slabs (a slab is convex; a separating face proves 0).
    sep = _separated(r_ab, t_ab, _corner_dirs(targets), near_t, far_t, g_b, c_b)
    r_ba = r_ab.transpose(-1, -2)
    t_ba = -torch.einsum("tmji,tmj->tmi", r_ab, t_ab)
    g_a, c_a = _frustum_planes(targets, near_t.new_zeros(t_n), far_t.new_zeros(t_n))
    # A's planes use near/far of B's frame (the slab is cut at the bank frame's depth range).
    c_a = c_a[:, None, :].repeat(1, m, 1)
    c_a[:, :, 0] = near_t[None]
    c_a[:, :, 1] = -far_t[None]
    dirs_b = _corner_dirs(others)
    rd_b = torch.einsum("tmij,mcj->tmci", r_ba, dirs_b)
    zb = torch.stack([near_t, far_t], dim=-1)
    corners_b = rd_b[:, :, None] * zb[None, :, :, None, None] + t_ba[:, :, None, None, :]
    side_b = torch.einsum("tkj,tmzcj->tmkzc", g_a, corners_b) - c_a[:, :, :, None, None]
    sep |= (side_b.flatten(-2) < 0).all(-1).any(-1)
    pairs = (~sep).nonzero()
    if len(pairs) == 0:
        return out

    d = _ray_grid(targets, samples).float()  # [T,P,3]
    p = d.shape[1]
    g_r = torch.einsum("mkj,tmji->tmki", g_b, r_ab).float()  # slope rows: a = (g R_ab) . d
    b0 = (torch.einsum("mkj,tmj->tmk", g_b, t_ab) - c_b[None]).float()  # a z + b0 >= 0
    near32, far32 = near_t.float(), far_t.float()
    step = max(1, chunk // (6 * p))
    for s in range(0, len(pairs), step):
        ti, mi = pairs[s : s + step, 0], pairs[s : s + step, 1]
        a = torch.bmm(d[ti], g_r[ti, mi].transpose(1, 2))  # [Q,P,6] slope of each constraint along each ray
        zero = a == 0
        if bool(zero.any()):
            # A constraint flat along a ray holds everywhere or nowhere; a tiny positive slope says exactly that.
            a = a.masked_fill(zero, 1e-30)
        bound = b0[ti, mi][:, None, :].neg() / a
        pos = a > 0
        lo = torch.where(pos, bound, -math.inf).amax(-1).clamp_(min=near32[mi, None])
        hi = torch.where(pos, math.inf, bound).amin(-1).clamp_(max=far32[mi, None])
        vol = (hi.pow(3) - lo.pow(3)).clamp_(min=0)  # empty interval (hi <= lo) -> 0
        out[ti, mi] = vol.double().mean(-1) / (far_t[mi] ** 3 - near_t[mi] ** 3)
    return out.clamp_(0.0, 1.0)


def closeness(targets: Cameras, others: Cameras, depth_scale: torch.Tensor) -> torch.Tensor:
    """``[T, M]`` tie-break cost: centre distance over the frame's scene depth plus the axis angle (radians)."""
    ct, cb = targets.centers.detach().cpu().double(), others.centers.detach().cpu().double()
    ft, fb = targets.forward.detach().cpu().double(), others.forward.detach().cpu().double()
    dist = torch.cdist(ct, cb)
    cos = (ft @ fb.T).clamp(-1.0, 1.0)
    return dist / depth_scale.double()[None, :] + torch.arccos(cos)


# ---- retrieval result --------------------------------------------------------------------------------

@dataclass
class Retrieval:
    """Which bank frame serves each target camera.

    ``per_target [T]`` int64 bank index (-1: none); ``refs`` distinct bank indices used (at most the
    limit); ``ref_index [R]`` the 0-based target index each ref is placed at; ``overlaps [T]`` the chosen
    frame's frustum overlap with each target (0 where none).
    """

    per_target: torch.Tensor
    refs: list[int] = field(default_factory=list)
    ref_index: list[int] = field(default_factory=list)
    overlaps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def to_json(self) -> dict:
        return {
            "refs": [int(r) for r in self.refs],
            "ref_index": [int(i) for i in self.ref_index],
            "per_target": [int(i) for i in self.per_target.tolist()],
            "overlaps": [round(float(o), 4) for o in self.overlaps.tolist()],
        }


def _preferred(o: torch.Tensor, cost: torch.Tensor, allowed: torch.Tensor, tie_tolerance: float) -> torch.Tensor:
    """Per row: the allowed column with the largest ``o``, ties (within tolerance) to the lowest ``cost``.
    Rows with no allowed positive column get -1."""
    o = torch.where(allowed, o, torch.full_like(o, -1.0))
    best = o.amax(dim=1, keepdim=True)
    near_best = allowed & (o >= best - tie_tolerance) & (o > 0)
    c = torch.where(near_best, cost, torch.full_like(cost, math.inf))
    pick = c.argmin(dim=1)  # argmin returns the first (lowest index) of equal costs
    return torch.where(near_best.any(dim=1), pick, torch.full_like(pick, -1))


def select_references(o: torch.Tensor, cost: torch.Tensor, max_refs: int, min_overlap: float,
                      tie_tolerance: float) -> Retrieval:
    """Apply the retrieval rule (module doc, steps 2-4) to an overlap matrix ``o [T,M]`` and costs ``[T,M]``."""
    t_n, m = o.shape
    o = torch.where(o >= min_overlap, o, torch.zeros_like(o))
    allowed = o > 0
    pref = _preferred(o, cost, allowed, tie_tolerance)
    distinct = sorted({int(i) for i in pref.tolist() if i >= 0})
    if len(distinct) > max_refs:
        votes = torch.bincount(pref[pref >= 0], minlength=m)
        cost_sum = torch.where(allowed, cost, torch.zeros_like(cost)).sum(0)
        cover = torch.zeros(t_n, dtype=o.dtype)
        kept: list[int] = []
        for _ in range(max_refs):
            gain = (o - cover[:, None]).clamp(min=0).sum(0)
            if kept:
                gain[kept] = -1.0
            if float(gain.max()) <= 0:
                break
            top = float(gain.max())
            cands = [j for j in range(m) if float(gain[j]) >= top - 1e-12]
            j = min(cands, key=lambda j: (-int(votes[j]), float(cost_sum[j]), j))
            kept.append(j)
            cover = torch.maximum(cover, o[:, j])
        mask = torch.zeros(m, dtype=torch.bool)
        mask[kept] = True
        pref = _preferred(o, cost, allowed & mask[None, :], tie_tolerance)
    chosen = pref.clone()
    rows = torch.arange(t_n)
    overlaps = torch.where(chosen >= 0, o[rows, chosen.clamp(min=0)], torch.zeros(t_n, dtype=o.dtype))
    refs_info = []
    for r in sorted({int(i) for i in chosen.tolist() if i >= 0}):
        served = (chosen == r).nonzero().flatten()
        best = served[o[served, r].argmax()]  # argmax gives the earliest target on ties
        refs_info.append((int(best), r))
    refs_info.sort()
    return Retrieval(per_target=chosen.to(torch.int64), refs=[r for _, r in refs_info],
                     ref_index=[i for i, _ in refs_info], overlaps=overlaps.double())


# ---- the release's rule (module doc); ``retrieve`` runs it instead of the rule above once the loop adopts it

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
class ReleaseRetrieval:
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
                        nframe: int = KEYFRAMES, max_refs: int = MAX_REFERENCES) -> ReleaseRetrieval:
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
        ``ReleaseRetrieval``: per_target [T-1], references and ref_index [R], R <= max_refs.
    """
    if len(bank) == 0:
        raise RetrievalError("The memory bank is empty, so there is nothing to retrieve; add the start view first.")
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
        return ReleaseRetrieval(chosen, per_target, references, ref_index)
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
    return ReleaseRetrieval(chosen, [selected[j] for j in picks], [selected[j] for j in distinct], ref_index,
                            selected=selected)
