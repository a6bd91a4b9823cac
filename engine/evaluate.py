"""Judging a scene as the paper does: how exactly each clip follows its cameras, and how good the reconstruction is.

This module is the one home of the definitions (the README's "Evaluate a scene" section repeats them).

Camera accuracy of a clip (``evaluate_clip``)
    The clip's frames go through structure from motion with pycolmap (COLMAP 4): SIFT features; exhaustive
    matching (a clip has at most a few dozen keyframes, 210 pairs for 21, so every pair is matched: orbits and
    loops that come back to their start get their closing pairs, which sequential matching's window would only
    reach through loop detection, and global rotation averaging gets every relative rotation there is); global
    mapping (GLOMAP, ``pycolmap.global_mapping``), and incremental mapping when the global one leaves frames out
    (the run that registers more frames is kept, the global one on a tie). The intrinsics are the clip's own
    cameras' (PINHOLE, held fixed in every bundle adjustment), so only the poses are estimated. When the mapper
    splits the frames into several models, the largest is judged and the others' frames count as unregistered.

    Let ``S`` be the registered frames (at least 3 are needed for any figure), ``A_i`` the asked world-to-camera
    pose of frame ``i`` (rotation ``R^A_i``, centre ``c^A_i``) and ``B_i`` the recovered one (``R^B_i``, ``c^B_i``,
    in the reconstruction's own frame and scale). ``r`` is the first registered frame.

    - **registered**: ``|S|`` of the clip's ``F`` frames (frames not in ``S`` are listed as unregistered).
    - **RotErr** (degrees) = sum over ``i`` in ``S`` of ``angle( (R^A_i R^A_r^T)^T (R^B_i R^B_r^T) )``: the
      geodesic angle between the asked and the recovered rotation of each frame relative to frame ``r``
      (``angle(R) = |log R|``, scipy's rotation magnitude). Frame ``r`` contributes 0.
    - **alignment**: the similarity ``x -> s Q x + t`` (Umeyama, least squares over the centres of ``S``, scale free
      because structure from motion has none) that maps the recovered centres ``c^B_i`` onto the asked ``c^A_i``.
    - **path length** ``L`` = sum over consecutive asked frames of ``|c^A_{i+1} - c^A_i|`` (all ``F`` frames): the
      unit of both translation figures, so they do not depend on the scene's scale.
    - **TransErr** = sum over ``i`` in ``S`` of ``|s Q c^B_i + t - c^A_i| / L``.
    - **ATE** = ``sqrt(mean over i in S of |s Q c^B_i + t - c^A_i|^2) / L`` (the RMSE of the aligned centres).
    A clip whose asked cameras do not move (``L`` = 0: a pan in place) has no translation figures.

Reconstruction against a reference cloud (``evaluate_reconstruction``)
    ``d_s``: distance of each point of the scene's cloud to the nearest reference point; ``d_r``: of each reference
    point to the nearest scene point (scipy KD-trees). At a threshold ``T``:
    - **precision** = share of scene points with ``d_s < T``; **recall** = share of reference points with
      ``d_r < T``; **F1** = ``2 P R / (P + R)`` (0 when both are 0).
    - **AUC** = ``(1/T) * integral from 0 to T of F1(tau) dtau``, computed exactly (F1 is a step function of
      ``tau`` between the sorted distances), so it lies in [0, 1] like F1.
    - Default ``T`` = ``DEFAULT_THRESHOLD_FRACTION`` (1 %) of the diagonal of the reference's bounding box.
    - ``align=True``: first a similarity from the scene's cloud to the reference: centroids and RMS spreads matched,
      then open3d's point-to-point ICP with scaling (Umeyama on the nearest-point correspondences of each
      iteration) at correspondence distances ``10 T``, ``3 T`` and ``T``, then a rigid point-to-plane ICP at ``T``.
      ICP refines a rough pose: the clouds must already be oriented about alike.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from engine.geometry.cameras import Cameras
from engine.progress import Progress, ensure

PathLike = Union[str, Path]

FORMAT_VERSION = 1
MIN_REGISTERED = 3  # fewest registered frames any figure needs (the similarity on centres, GLOMAP's smallest model)
DEFAULT_THRESHOLD_FRACTION = 0.01  # reconstruction threshold: this fraction of the reference's bounding-box diagonal
ICP_STAGES = (10.0, 3.0, 1.0)  # ICP correspondence distances, in units of the threshold
ICP_ITERATIONS = 50  # per stage
MATCHING = "exhaustive"
VERSIONED_PACKAGES = ("pycolmap", "open3d", "scipy", "numpy", "torch")

DEFINITIONS = {
    "registered": "frames whose pose structure from motion recovered (pycolmap: SIFT, exhaustive matching, global "
                  "mapping with incremental fallback, the clip's own intrinsics held fixed)",
    "rot_err_deg": "RotErr: sum over registered frames of the geodesic angle (degrees) between the asked and the "
                   "recovered rotation relative to the first registered frame",
    "trans_err": "TransErr: sum over registered frames of the distance between asked and recovered camera centres "
                 "after a similarity (Umeyama) on the centres, in units of the asked path's length",
    "ate": "ATE: root mean square of the same centre distances, in units of the asked path's length",
    "path_length": "length of the asked camera path (sum of distances between consecutive centres), scene units",
    "precision": "share of the scene's points within the threshold of the reference cloud",
    "recall": "share of the reference's points within the threshold of the scene's cloud",
    "f1": "harmonic mean of precision and recall at the threshold",
    "auc": "mean of F1 over thresholds from 0 to the threshold (exact integral / threshold)",
    "threshold": f"distance threshold in scene units; default {DEFAULT_THRESHOLD_FRACTION:g} of the diagonal of the "
                 "reference cloud's bounding box",
}


class EvaluationError(ValueError):
    """Evaluation inputs that cannot be used (no clips, unknown clip names, a bad threshold); one sentence."""


# ---- recovering poses --------------------------------------------------------------------------------------------
@dataclass
class RecoveredPoses:
    """What structure from motion made of a clip's frames: ``w2c [F,4,4]`` (NaN for unregistered frames) in the
    reconstruction's own frame and scale, which frames are ``registered``, the ``mapper`` kept (``global``,
    ``incremental`` or ``none``), a ``note`` on what went wrong (empty when every frame registered) and
    ``seconds`` per stage."""

    w2c: np.ndarray
    registered: np.ndarray
    mapper: str
    note: str = ""
    seconds: dict = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_colmap():
    """COLMAP logs every stage through glog, and frames it cannot register as errors: the report says what failed."""
    import pycolmap

    before = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 3
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = before


def _intrinsic_groups(cameras: Cameras) -> list[tuple[list[int], str]]:
    """Frames sharing one pinhole camera: ``[(frame indices, "fx,fy,cx,cy")]`` in frame order."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(cameras.K.detach().cpu().double().numpy()):
        params = ",".join(repr(float(v)) for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))
        groups.setdefault(params, []).append(i)
    return [(frames, params) for params, frames in groups.items()]


def _largest(models: dict) -> Optional[object]:
    return max(models.values(), key=lambda m: m.num_reg_images(), default=None)


def _poses(model, names: Sequence[str]) -> np.ndarray:
    w2c = np.full((len(names), 4, 4), np.nan)
    if model is None:
        return w2c
    index = {name: i for i, name in enumerate(names)}
    for image in model.images.values():
        if image.has_pose and image.name in index:
            w2c[index[image.name], :3] = image.cam_from_world().matrix()
            w2c[index[image.name], 3] = (0, 0, 0, 1)
    return w2c


def recover_poses(frames: torch.Tensor, cameras: Cameras, *, threads: int = 2, seed: int = 0) -> RecoveredPoses:
    """Recover the poses of ``frames [F,3,H,W]`` (in [0,1]) with pycolmap, the intrinsics fixed to ``cameras``'
    (module doc). Frames that cannot be registered (noise, no texture) come back as such, never as an exception."""
    import pycolmap

    from engine.images import save_image

    if frames.dim() != 4 or frames.shape[1] != 3:
        raise EvaluationError(f"Frames must be a tensor [F,3,H,W]; got shape {tuple(frames.shape)}.")
    n, _, h, w = frames.shape
    if len(cameras) != n:
        raise EvaluationError(f"A clip of {n} frames needs {n} cameras; got {len(cameras)}.")
    if (cameras.width, cameras.height) != (w, h):
        cameras = cameras.resized(w, h)
    names = [f"{i:04d}.png" for i in range(n)]
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp, _quiet_colmap():
        tmp = Path(tmp)
        images, database = tmp / "images", tmp / "database.db"
        for name, frame in zip(names, frames):
            save_image(images / name, frame)
        pycolmap.set_random_seed(seed)
        t0 = time.perf_counter()
        extraction = pycolmap.FeatureExtractionOptions(num_threads=threads, use_gpu=False)
        for group, params in _intrinsic_groups(cameras):  # one fixed PINHOLE camera per distinct intrinsics
            reader = pycolmap.ImageReaderOptions(camera_model="PINHOLE", camera_params=params)
            pycolmap.extract_features(database, images, image_names=[names[i] for i in group],
                                      camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                                      extraction_options=extraction, device=pycolmap.Device.cpu)
        seconds["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pycolmap.match_exhaustive(database, matching_options=pycolmap.FeatureMatchingOptions(num_threads=threads,
                                                                                             use_gpu=False),
                                  device=pycolmap.Device.cpu)
        seconds["matching"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        model = _largest(pycolmap.global_mapping(database, images, tmp / "global", _global_options(threads, seed)))
        mapper = "global"
        if model is None or model.num_reg_images() < n:
            fallback = _largest(pycolmap.incremental_mapping(database, images, tmp / "incremental",
                                                             _incremental_options(threads, seed)))
            if fallback is not None and (model is None or fallback.num_reg_images() > model.num_reg_images()):
                model, mapper = fallback, "incremental"
        seconds["mapping"] = time.perf_counter() - t0
        w2c = _poses(model, names)
    registered = np.isfinite(w2c[:, 0, 0])
    note = ""
    if not registered.any():
        mapper = "none"
        note = "no frame registered (no views that structure from motion could tie together: noise, no texture?)"
    elif not registered.all():
        missing = ", ".join(str(i) for i in np.flatnonzero(~registered))
        note = f"{int(registered.sum())} of {n} frames registered; not registered: {missing}"
    return RecoveredPoses(w2c=w2c, registered=registered, mapper=mapper, note=note, seconds=seconds)


def _global_options(threads: int, seed: int):
    import pycolmap

    options = pycolmap.GlobalPipelineOptions(num_threads=threads, random_seed=seed)
    mapper = options.mapper
    mapper.num_threads, mapper.random_seed = threads, seed
    ba = mapper.bundle_adjustment
    ba.refine_focal_length = ba.refine_principal_point = ba.refine_extra_params = False
    ba.ceres.use_gpu = mapper.global_positioning.use_gpu = False
    ba.ceres.solver_options.num_threads = threads
    return options


def _incremental_options(threads: int, seed: int):
    import pycolmap

    options = pycolmap.IncrementalPipelineOptions(num_threads=threads, random_seed=seed, min_model_size=MIN_REGISTERED)
    options.ba_refine_focal_length = options.ba_refine_principal_point = options.ba_refine_extra_params = False
    options.mapper.abs_pose_refine_focal_length = options.mapper.abs_pose_refine_extra_params = False
    options.mapper.num_threads, options.mapper.random_seed = threads, seed
    return options


# ---- judging poses -----------------------------------------------------------------------------------------------
def similarity(source: np.ndarray, target: np.ndarray) -> Optional[tuple[float, np.ndarray, np.ndarray]]:
    """The least-squares similarity ``target ~ s * R @ source + t`` of corresponding points ``[N,3]`` (Umeyama, via
    open3d's point-to-point estimation with scaling): ``(s, R [3,3], t [3])``, or None when the source points all
    coincide. Coplanar and collinear sets are fine (pycolmap's ``estimate_sim3d`` refuses coplanar ones, and camera
    paths are often planar)."""
    import open3d as o3d

    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(source, dtype=np.float64)))
    dst = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(target, dtype=np.float64)))
    pairs = o3d.utility.Vector2iVector(np.repeat(np.arange(len(source), dtype=np.int32)[:, None], 2, axis=1))
    m = o3d.pipelines.registration.TransformationEstimationPointToPoint(with_scaling=True).compute_transformation(
        src, dst, pairs)
    if not np.isfinite(m).all() or np.linalg.det(m[:3, :3]) <= 0:
        return None
    s = float(np.cbrt(np.linalg.det(m[:3, :3])))  # s R has determinant s^3
    return s, m[:3, :3] / s, m[:3, 3].copy()


def _centres(w2c: np.ndarray) -> np.ndarray:
    return -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])


@dataclass
class ClipEvaluation:
    """One clip judged against its asked cameras (module doc for every figure). Per-frame lists hold ``None`` for
    unregistered frames; the figures are ``None`` when fewer than ``MIN_REGISTERED`` frames registered (or, for
    the translation ones, when the asked cameras do not move). Centres are in the scene's units, the recovered
    ones after the alignment."""

    frames: int
    registered: list[bool]
    mapper: str
    rot_err_deg: Optional[float]
    trans_err: Optional[float]
    ate: Optional[float]
    path_length: float
    frame_rot_err_deg: list[Optional[float]]
    frame_centre_err: list[Optional[float]]
    asked_centres: list[list[float]]
    recovered_centres: list[Optional[list[float]]]
    note: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def registered_count(self) -> int:
        return int(sum(self.registered))

    def to_json(self) -> dict:
        return {"frames": self.frames, "registered": self.registered_count, "registered_frames": self.registered,
                "mapper": self.mapper, "rot_err_deg": self.rot_err_deg, "trans_err": self.trans_err, "ate": self.ate,
                "path_length": self.path_length, "frame_rot_err_deg": self.frame_rot_err_deg,
                "frame_centre_err": self.frame_centre_err, "asked_centres": self.asked_centres,
                "recovered_centres": self.recovered_centres, "note": self.note,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _per_frame(values: np.ndarray, registered: np.ndarray) -> list[Optional[float]]:
    return [float(v) if ok else None for v, ok in zip(values, registered)]


def judge_poses(asked: Cameras, recovered: RecoveredPoses) -> ClipEvaluation:
    """RotErr, TransErr and ATE of ``recovered`` poses against the ``asked`` cameras (module doc)."""
    from scipy.spatial.transform import Rotation

    a = asked.w2c.detach().cpu().double().numpy()
    n = len(a)
    if len(recovered.w2c) != n:
        raise EvaluationError(f"{len(recovered.w2c)} recovered poses cannot be judged against {n} cameras.")
    ca = _centres(a)
    path = float(np.linalg.norm(np.diff(ca, axis=0), axis=1).sum())
    reg = np.asarray(recovered.registered, dtype=bool)
    base = dict(frames=n, registered=[bool(r) for r in reg], mapper=recovered.mapper, path_length=path,
                asked_centres=ca.tolist(), seconds=dict(recovered.seconds))
    if reg.sum() < MIN_REGISTERED:
        note = recovered.note or f"{int(reg.sum())} of {n} frames registered"
        if reg.any():
            note += f"; at least {MIN_REGISTERED} are needed for any figure"
        return ClipEvaluation(rot_err_deg=None, trans_err=None, ate=None, frame_rot_err_deg=[None] * n,
                              frame_centre_err=[None] * n, recovered_centres=[None] * n, note=note, **base)
    b = recovered.w2c
    r0 = int(np.flatnonzero(reg)[0])
    rel_a = a[:, :3, :3] @ a[r0, :3, :3].T
    rel_b = np.where(reg[:, None, None], b[:, :3, :3], np.eye(3)) @ b[r0, :3, :3].T
    rot = np.degrees(Rotation.from_matrix(np.transpose(rel_a, (0, 2, 1)) @ rel_b).magnitude())
    cb = _centres(np.where(reg[:, None, None], b, np.eye(4)))
    still = path <= 1e-9 * max(1.0, float(np.abs(ca).max()))
    fit = None if still else similarity(cb[reg], ca[reg])
    if fit is None:
        why = "the asked cameras do not move" if still else "the recovered cameras all sit at one point"
        note = "; ".join(filter(None, [recovered.note, f"{why}, so there are no translation figures"]))
        return ClipEvaluation(rot_err_deg=float(rot[reg].sum()), trans_err=None, ate=None,
                              frame_rot_err_deg=_per_frame(rot, reg), frame_centre_err=[None] * n,
                              recovered_centres=[None] * n, note=note, **base)
    s, q, t = fit
    aligned = s * cb @ q.T + t
    err = np.linalg.norm(aligned - ca, axis=1) / path
    return ClipEvaluation(
        rot_err_deg=float(rot[reg].sum()), trans_err=float(err[reg].sum()), ate=float(np.sqrt(np.mean(err[reg] ** 2))),
        frame_rot_err_deg=_per_frame(rot, reg), frame_centre_err=_per_frame(err, reg),
        recovered_centres=[p.tolist() if ok else None for p, ok in zip(aligned, reg)], note=recovered.note, **base)


def evaluate_clip(frames: torch.Tensor, cameras: Cameras, *, threads: int = 2, seed: int = 0) -> ClipEvaluation:
    """Camera accuracy of one clip: ``frames [F,3,H,W]`` in [0,1] judged against the ``cameras`` they were asked
    to follow (``recover_poses`` then ``judge_poses``)."""
    return judge_poses(cameras, recover_poses(frames, cameras, threads=threads, seed=seed))


# ---- reconstruction ----------------------------------------------------------------------------------------------
@dataclass
class ReconstructionEvaluation:
    """The scene's cloud against a reference (module doc). ``transform`` is the 4x4 similarity applied to the
    scene's cloud first (identity without alignment)."""

    precision: float
    recall: float
    f1: float
    auc: float
    threshold: float
    threshold_rule: str
    aligned: bool
    transform: list[list[float]]
    points: int
    reference_points: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _f1(p, r):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), 0.0)


def f1_auc(d_scene: np.ndarray, d_reference: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """``(precision, recall, F1, AUC)`` at ``threshold`` from the two nearest-neighbour distance lists (module
    doc); the AUC integral is exact over the step function F1(tau)."""
    ds, dr = np.sort(np.asarray(d_scene, np.float64)), np.sort(np.asarray(d_reference, np.float64))
    if not (len(ds) and len(dr)):
        return 0.0, 0.0, 0.0, 0.0
    p, r = float(np.mean(ds < threshold)), float(np.mean(dr < threshold))
    # F1(tau) only changes at the distances: on (b_k, b_k+1] it is F1 of the counts of distances <= b_k.
    cuts = np.unique(np.concatenate([[0.0], ds[ds < threshold], dr[dr < threshold], [threshold]]))
    left = cuts[:-1]
    f = _f1(np.searchsorted(ds, left, side="right") / len(ds), np.searchsorted(dr, left, side="right") / len(dr))
    auc = float(np.sum(f * np.diff(cuts)) / threshold)
    return p, r, float(_f1(np.float64(p), np.float64(r))), auc


def align_clouds(points: np.ndarray, reference: np.ndarray, threshold: float) -> np.ndarray:
    """The similarity (4x4) that brings ``points`` onto ``reference`` (module doc: moments, then ICP with scaling)."""
    import open3d as o3d

    reg = o3d.pipelines.registration
    mu_p, mu_r = points.mean(axis=0), reference.mean(axis=0)
    spread_p = np.sqrt(((points - mu_p) ** 2).sum(axis=1).mean())
    spread_r = np.sqrt(((reference - mu_r) ** 2).sum(axis=1).mean())
    s = spread_r / spread_p if spread_p > 0 else 1.0
    init = np.eye(4)
    init[:3, :3] *= s
    init[:3, 3] = mu_r - s * mu_p
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    dst = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(reference.astype(np.float64)))
    # ICP needs no more points than one per half threshold; far fewer keeps it to a second on a million points.
    src, dst = src.voxel_down_sample(threshold / 2), dst.voxel_down_sample(threshold / 2)
    transform = init
    criteria = reg.ICPConvergenceCriteria(max_iteration=ICP_ITERATIONS)
    for stage in ICP_STAGES:
        scaled = reg.TransformationEstimationPointToPoint(with_scaling=True)
        transform = reg.registration_icp(src, dst, stage * threshold, transform, scaled, criteria).transformation
    # Point-to-point pairs lock onto the nearest sample, so a sampled surface holds the pose a sample spacing off;
    # pairs to the reference's tangent planes let it slide the rest of the way (scale kept from above).
    dst.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=2 * threshold, max_nn=30))
    return reg.registration_icp(src, dst, threshold, transform, reg.TransformationEstimationPointToPlane(),
                                criteria).transformation


def evaluate_reconstruction(points: np.ndarray, reference: np.ndarray, threshold: Optional[float] = None,
                            align: bool = False, threads: int = 2) -> ReconstructionEvaluation:
    """Precision, recall, F1 and AUC of ``points [N,3]`` (the scene's cloud) against ``reference [M,3]``."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if len(points) == 0 or len(reference) == 0:
        raise EvaluationError("Both the scene's cloud and the reference cloud need points to be compared.")
    rule = "given"
    if threshold is None:
        diagonal = float(np.linalg.norm(reference.max(axis=0) - reference.min(axis=0)))
        threshold = DEFAULT_THRESHOLD_FRACTION * diagonal
        rule = f"{DEFAULT_THRESHOLD_FRACTION:g} x the reference's bounding-box diagonal ({diagonal:.6g})"
    if not (threshold > 0 and math.isfinite(threshold)):
        raise EvaluationError(f"The threshold must be a positive distance; got {threshold}.")
    transform = align_clouds(points, reference, threshold) if align else np.eye(4)
    moved = points @ transform[:3, :3].T + transform[:3, 3]
    d_scene = cKDTree(reference).query(moved, k=1, workers=threads)[0]
    d_reference = cKDTree(moved).query(reference, k=1, workers=threads)[0]
    p, r, f, auc = f1_auc(d_scene, d_reference, threshold)
    return ReconstructionEvaluation(precision=p, recall=r, f1=f, auc=auc, threshold=float(threshold),
                                    threshold_rule=rule, aligned=bool(align), transform=transform.tolist(),
                                    points=len(points), reference_points=len(reference))


# ---- a scene -----------------------------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate_scene(job_dir: PathLike, clips: Optional[Sequence[str]] = None, reference_cloud: Optional[PathLike] = None,
                   threshold: Optional[float] = None, align: bool = False, *, threads: int = 2, seed: int = 0,
                   progress: Optional[Progress] = None) -> dict:
    """Judge the committed clips of the scene in ``job_dir`` (all, or those named in ``clips``) and, given a
    ``reference_cloud`` PLY, its ``scene.ply``: the report ``write_evaluation`` writes (JSON-ready)."""
    from engine.geometry.cache import PointCache
    from engine.jobfolder import JobFolder

    folder = JobFolder(job_dir)
    records = folder.read_manifest()["clips"]
    if not records:
        raise EvaluationError(f"{folder.path} holds no finished clip to evaluate; generate one first.")
    if clips:
        known = {c["name"]: c for c in records}
        unknown = [name for name in clips if name not in known]
        if unknown:
            raise EvaluationError(f"No clip named {', '.join(unknown)} in this scene; its clips are: "
                                  f"{', '.join(known)}.")
        records = [known[name] for name in dict.fromkeys(clips)]
    if (threshold is not None or align) and reference_cloud is None:
        raise EvaluationError("A threshold or an alignment judges the reconstruction against a reference: give a "
                              "reference cloud too (--reference-cloud FILE.ply).")
    if threshold is not None and not (threshold > 0 and math.isfinite(threshold)):
        raise EvaluationError(f"The threshold must be a positive distance; got {threshold}.")
    reference = None
    if reference_cloud is not None:
        reference = PointCache.load_ply(reference_cloud).points.numpy()
        cloud_file = folder.scene_files().cloud
        if not cloud_file.is_file():
            raise EvaluationError(f"{folder.path} has no {cloud_file.name} to compare with the reference.")
    report = ensure(progress)
    results, asked = [], []
    share = (0.9 if reference is not None else 1.0) / len(records)  # of the progress bar, per clip
    for i, record in enumerate(records):
        report(i * share, f"recovering the cameras of {record['name']}")
        result, cameras = judge_committed_clip(folder, record, threads=threads, seed=seed)
        results.append(result)
        asked.append(cameras)
    reconstruction = None
    if reference is not None:
        report(0.9, "comparing the reconstruction with the reference")
        cloud = PointCache.load_ply(cloud_file).points.numpy()
        reconstruction = evaluate_reconstruction(cloud, reference, threshold, align, threads=threads).to_json()
        reconstruction["reference"] = Path(reference_cloud).name
    report(1.0, "evaluation done")
    return scene_report(results, asked, reconstruction, threads=threads, seed=seed)


def judge_committed_clip(folder, record: dict, *, threads: int = 2, seed: int = 0) -> tuple[dict, Cameras]:
    """``evaluate_clip`` of a committed clip of the job folder ``folder`` (an ``engine.jobfolder.JobFolder``) from
    its files: its entry in the report (with its name and trajectory) and its asked cameras."""
    t0 = time.perf_counter()
    cameras = folder.clip_cameras(record)
    result = evaluate_clip(folder.clip_frames(record), cameras, threads=threads, seed=seed)
    result.seconds["total"] = time.perf_counter() - t0
    return {"name": record["name"], "trajectory": record.get("trajectory", record["name"]), **result.to_json()}, cameras


def scene_report(results: list[dict], asked: list[Cameras], reconstruction: Optional[dict], *, threads: int,
                 seed: int) -> dict:
    """The report of judged clips (``judge_committed_clip``) and a reconstruction figure: per clip, the scene's
    means, the definitions, the settings and the versions (what ``write_evaluation`` writes)."""
    from engine.jobfolder import package_versions

    scene = {"clips": len(results), "frames": sum(r["frames"] for r in results),
             "registered": sum(r["registered"] for r in results),
             "clips_with_figures": sum(r["rot_err_deg"] is not None for r in results)}
    scene.update({key: _mean(r[key] for r in results) for key in ("rot_err_deg", "trans_err", "ate")})
    return {"format": FORMAT_VERSION, "definitions": DEFINITIONS, "versions": package_versions(VERSIONED_PACKAGES),
            "settings": {"matching": MATCHING, "mapping": "global (GLOMAP), incremental fallback",
                         "intrinsics": "fixed to the clip's cameras (PINHOLE)", "threads": threads, "seed": seed},
            "clips": results, "scene": scene, "reconstruction": reconstruction, "up": up_direction(asked)}


class ClipEvaluator:
    """Camera accuracy of each clip as the scene loop commits it (``generate --evaluate``): a thread of its own
    judges the clips in turn from their committed files, off the loop's critical path. ``report`` waits for the last
    and gives what ``evaluate_scene`` gives for the same clips."""

    def __init__(self, job_dir: PathLike, *, threads: int = 1, seed: int = 0):
        from concurrent.futures import ThreadPoolExecutor

        from engine.jobfolder import JobFolder

        self.folder = JobFolder(job_dir)
        self.threads, self.seed = threads, seed
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clip-evaluator")
        self._judged = []

    def submit(self, record: dict) -> None:
        """Judge the committed clip ``record`` (its manifest entry) after those submitted before it."""
        self._judged.append(self._pool.submit(judge_committed_clip, self.folder, record, threads=self.threads,
                                              seed=self.seed))

    def cancel(self) -> None:
        """Drop the clips not yet judged (the run failed: nothing will be reported), without waiting for them."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def report(self) -> dict:
        """The report of every submitted clip, once all are judged."""
        try:
            judged = [j.result() for j in self._judged]
        finally:
            self._pool.shutdown(wait=True)
        if not judged:
            raise EvaluationError("There is no finished clip to evaluate.")
        return scene_report([r for r, _ in judged], [c for _, c in judged], None, threads=self.threads,
                            seed=self.seed)


# ---- writing -----------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = ("clip", "registered", "RotErr (deg)", "TransErr", "ATE", "mapper")


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """The rows of the report's table under ``TABLE_HEADER``: one per clip, then the scene's means (``mean``);
    figures with 3 decimals, ``-`` where there is none."""
    rows = []
    for c in report["clips"]:
        rows.append((c["name"], f"{c['registered']}/{c['frames']}", _fmt(c["rot_err_deg"]), _fmt(c["trans_err"]),
                     _fmt(c["ate"]), c["mapper"]))
    s = report["scene"]
    rows.append(("mean", f"{s['registered']}/{s['frames']}", _fmt(s["rot_err_deg"]), _fmt(s["trans_err"]),
                 _fmt(s["ate"]), ""))
    return rows


def table_notes(report: dict) -> list[str]:
    """What the table leaves out, one line each: the clips' notes (frames not registered) and the reconstruction."""
    notes = [f"{c['name']}: {c['note']}" for c in report["clips"] if c["note"]]
    rec = report.get("reconstruction")
    if rec:
        aligned = " (aligned)" if rec["aligned"] else ""
        reference = rec.get("reference", "the reference")
        notes.append(f"reconstruction vs {reference}{aligned} at T = {rec['threshold']:.4g}: "
                     f"precision {100 * rec['precision']:.2f}, recall {100 * rec['recall']:.2f}, "
                     f"F1 {100 * rec['f1']:.2f}, AUC {100 * rec['auc']:.2f} (%)")
    return notes


def table(report: dict) -> str:
    """The report as a plain-text table and its notes (what the CLI prints and the README shows)."""
    rows = [TABLE_HEADER] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines + table_notes(report))


def up_direction(cameras: Sequence[Cameras]) -> dict:
    """The world axis nearest to the asked cameras' mean 'up' (camera -y, OpenCV) and its sign: how the picture
    stands a scene up (photo scenes live in the input camera's frame, y down; panoramas in a z-up world)."""
    up = -torch.cat([c.R[:, 1, :].double() for c in cameras]).mean(dim=0).cpu().numpy()
    axis = int(np.argmax(np.abs(up)))
    return {"axis": axis, "sign": 1.0 if up[axis] >= 0 else -1.0}


def plot(report: dict, path: PathLike) -> Path:
    """Asked (solid) and recovered (dashed, aligned) camera paths of every clip, seen from above and from the side,
    one colour per clip, stood up by the report's ``up`` (``up_direction``)."""
    # A bare Figure (no pyplot): no global backend or figure registry, so a server can draw from several threads.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from engine.atomicio import atomic_path

    up_axis, up_sign = report["up"]["axis"], report["up"]["sign"]
    horizontal = [a for a in range(3) if a != up_axis]
    colours = colormaps["tab10"]
    fig = Figure(figsize=(10, 4.6), dpi=100)
    axes = fig.subplots(1, 2)
    views = (("top view", horizontal[0], horizontal[1], 1.0), ("side view", horizontal[0], up_axis, up_sign))
    for ax, (title, u, v, sign) in zip(axes, views):
        for k, clip in enumerate(report["clips"]):
            colour = colours(k % 10)
            asked = np.asarray(clip["asked_centres"])
            ax.plot(asked[:, u], sign * asked[:, v], "-o", color=colour, markersize=2.5, linewidth=1.4,
                    label=f"{clip['name']} asked")
            got = [p for p in clip["recovered_centres"] if p is not None]
            if got:
                got = np.asarray(got)
                ax.plot(got[:, u], sign * got[:, v], "--x", color=colour, markersize=4, linewidth=1.0,
                        label=f"{clip['name']} recovered ({clip['registered']}/{clip['frames']})")
        names = "xyz"
        ax.set_title(title)
        ax.set_xlabel(names[u])
        ax.set_ylabel(f"{'-' if sign < 0 else ''}{names[v]}")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(True, linewidth=0.3)
    axes[1].legend(fontsize=7, loc="best")
    s = report["scene"]
    fig.suptitle(f"asked (solid) vs recovered (dashed) cameras — registered {s['registered']}/{s['frames']}, "
                 f"RotErr {_fmt(s['rot_err_deg'])} deg, TransErr {_fmt(s['trans_err'])}, ATE {_fmt(s['ate'])}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_evaluation(report: dict, json_path: PathLike, png_path: PathLike) -> tuple[Path, Path]:
    """Write the report as JSON and its picture (``plot``); returns both paths."""
    from engine.atomicio import atomic_write_json

    atomic_write_json(json_path, report)
    return Path(json_path), plot(report, png_path)


# ---- the scene's own evaluation ------------------------------------------------------------------------------------
def write_scene_evaluation(job_dir: PathLike, report: dict) -> tuple[Path, Path]:
    """Write ``report`` as the scene's evaluation (``SceneFiles.evaluation``, ``evaluation_plot``) and, when the
    scene has a zip (it was exported), the zip again, so that it holds them. Returns both paths."""
    from engine.jobfolder import JobFolder

    folder = JobFolder(job_dir)
    files = folder.scene_files()
    paths = write_evaluation(report, files.evaluation, files.evaluation_plot)
    if files.zip.is_file():
        folder.write_zip()
    return paths


@dataclass
class SceneEvaluation:
    """The scene's evaluation as it stands: its ``report`` and the scene's committed clips it does not judge
    (``unjudged``: added after it, or left out by ``--clips``). Removing a clip it judged removed it
    (``JobFolder.remove_evaluation_of``), so every clip it names is still the scene's."""

    report: dict
    unjudged: list[str]


def read_scene_evaluation(job_dir: PathLike) -> Optional[SceneEvaluation]:
    """The evaluation of the scene in ``job_dir`` (``write_scene_evaluation``); None when it has none, or one that
    cannot be read."""
    from engine.jobfolder import JobFolder

    folder = JobFolder(job_dir)
    report = folder.read_evaluation()
    if report is None:
        return None
    judged = {clip["name"] for clip in report["clips"]}
    return SceneEvaluation(report, [c["name"] for c in folder.read_manifest()["clips"] if c["name"] not in judged])
