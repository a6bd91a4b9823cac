"""The one home of the official WorldStereo input conventions: what the transformer receives, pixel by pixel.

Everything that turns the engine's cameras, cache renders, masks, references and images into the tensors the
released checkpoints were trained on lives here, and each function says which official behaviour it reproduces
(file and function of the public release). The engine's own conventions stop at this module:

====================  ==========================================  ==========================================
                      engine (everywhere else)                    official (what leaves this module)
====================  ==========================================  ==========================================
images                float [3,H,W] in [0,1]                      PIL uint8 (CLIP), float in [-1,1] (VAE)
render mask           bool [F,H,W], True = a point landed          float [1,1,F,H,W], 1 = hole, frame 0 = 0
render video          [F,3,H,W] in [0,1], holes black              [1,3,F,H,W] in [-1,1], holes 0, frame 0 = image
cameras               ``Cameras`` (w2c, K, OpenCV axes)           normalised w2c, Plücker (d, o x d), codes
====================  ==========================================  ==========================================

``ClipConditions`` holds one clip's conditions before any VAE encoding; ``engine.pipeline`` encodes and feeds
them, and ``python -m engine conditions`` writes them to a safetensors file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.constants import SIZE_MULTIPLE
from engine.geometry.cameras import Cameras, rigid_inverse
from engine.geometry.retrieval import References
from engine.images import to_pil

PathLike = Union[str, Path]

# The released defaults (release: models/worldstereo_wrapper.py, src/data_utils.py).
DEFAULT_SCALE_MAP = ((480, 768), (512, 720), (576, 640), (608, 608), (640, 576), (720, 512), (768, 480))
CAMERA_SCALE = 2.0
RENDER_RADIUS_NDC = 0.008  # the point renderer's radius (release: src/data_utils.py), in PyTorch3D NDC
RENDER_FILES = ("camera.json", "render.mp4", "render_mask.mp4")


class ClipInputError(ValueError):
    """Inputs to one clip that cannot be turned into the model's conditions; the message says what to change."""


# ---- size, buckets, keyframes ------------------------------------------------------------------------

def scale_map_buckets(scale_map=None) -> list[tuple[int, int]]:
    """``(h, w)`` buckets of a checkpoint's ``scale_map`` (a list of ``[h, w]``, or a mapping to them), else the
    release's default map."""
    if scale_map is None:
        return [tuple(b) for b in DEFAULT_SCALE_MAP]
    items = scale_map.values() if isinstance(scale_map, dict) else scale_map
    out = [(int(h), int(w)) for h, w in items]
    if not out:
        raise ClipInputError("The checkpoint's scale_map is empty; it needs at least one [height, width].")
    return out


def assign_bucket(height: int, width: int, scale_map=None) -> tuple[int, int]:
    """The bucket whose h/w is nearest to the image's h/w (absolute difference, first on ties) — as the
    release's ``assign_scale`` (release: src/data_utils.py)."""
    buckets = scale_map_buckets(scale_map)
    ratios = np.array([h / w for h, w in buckets])
    return buckets[int(np.argmin(np.abs(ratios - height / width)))]


def scale_bucket(bucket: tuple[int, int], factor: float) -> tuple[int, int]:
    """A bucket at ``factor`` times its size, each side rounded to a multiple of 16 (the small engines' sizes)."""
    return tuple(max(SIZE_MULTIPLE, int(round(side * factor / SIZE_MULTIPLE)) * SIZE_MULTIPLE) for side in bucket)


def stretch_to_bucket(image: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The image (float ``[3,H0,W0]`` in [0,1]) stretched — not cropped — to ``size = (h, w)`` with PIL bicubic on
    its uint8 pixels, as ``load_single_view_data`` / ``load_mutli_traj_dataset`` do."""
    h, w = size
    return to_pil(image).resize((int(w), int(h)), Image.Resampling.BICUBIC)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as float ``[3,H,W]`` in [0,1] (torchvision's ``ToTensor``)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def keyframe_indices(count: int, nframe: int) -> np.ndarray:
    """Which of ``count`` frames a clip keeps: ``np.linspace(0, count-1, nframe, dtype=int)`` when there are more
    than ``nframe``, else all — the release's subsampling of cameras, intrinsics, render video and mask alike."""
    if count > nframe:
        return np.linspace(0, count - 1, nframe, dtype=int)
    return np.arange(count)


def select_keyframes(cameras: Cameras, nframe: int) -> Cameras:
    """The cameras of the kept keyframes (see ``keyframe_indices``)."""
    idx = keyframe_indices(len(cameras), nframe)
    if len(idx) == len(cameras):
        return cameras
    return replace(cameras[torch.as_tensor(idx)], motion_list=cameras.motion_list)


def rescale_intrinsics(K: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Pixel intrinsics of an image stretched from ``(h0, w0)`` to ``(h, w)``: row 0 x w/w0, row 1 x h/h0."""
    (h0, w0), (h, w) = from_size, to_size
    out = K.clone()
    out[..., 0, :] = K[..., 0, :] / w0 * w
    out[..., 1, :] = K[..., 1, :] / h0 * h
    return out


# ---- camera normalisation and codes ------------------------------------------------------------------

def _recentre_and_scale(c2w: torch.Tensor, num_targets: int, camera_scale: float) -> torch.Tensor:
    """Shared tail of both official normalisations (float64 c2w in, normalised w2c out): centres moved to the
    mean centre of the targets (targets farther than 10x the 97th percentile of distances to their median centre
    left out of the mean), then every translation scaled so that target 0's centre lies at ``camera_scale``
    (scaled by ``camera_scale`` when it already sits at the mean)."""
    c2w = c2w.clone()
    centres = c2w[:num_targets, :3, 3]
    median = centres.median(dim=0, keepdim=True).values  # torch.median: the lower median, as the release
    dist = (centres - median).norm(dim=-1)
    valid = dist <= torch.clamp(torch.quantile(dist, 0.97) * 10, max=1e6)
    c2w[:, :3, 3] -= centres[valid].mean(dim=0, keepdim=True)
    d0 = c2w[0, :3, 3].norm()
    factor = camera_scale if bool(d0 <= 1e-5) else camera_scale / d0
    w2c = rigid_inverse(c2w)
    w2c[:, :3, 3] *= factor
    return w2c


def center_normalized_w2c(w2c: torch.Tensor, camera_scale: float = CAMERA_SCALE) -> torch.Tensor:
    """``camera_center_normalization(..., is_w2c=True)`` of release: models/camera.py over one trajectory ``[F,4,4]``:
    w2c right-multiplied by c2w of camera 0 (camera 0 becomes the identity), then re-centred and scaled
    (``_recentre_and_scale``). float64 in, float64 out."""
    w2c = w2c.double()
    rel = w2c @ rigid_inverse(w2c[0:1])
    return _recentre_and_scale(rigid_inverse(rel), len(rel), camera_scale)


def unified_normalized_w2c(w2c: torch.Tensor, w2c_ref: torch.Tensor,
                           camera_scale: float = CAMERA_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """``unified_camera_normalization`` of release: models/camera.py: targets ``[F,4,4]`` and references ``[R,4,4]`` in
    one frame — right-multiplied by c2w of target 0, re-centred on the targets' mean centre and scaled by target
    0's distance (``_recentre_and_scale`` over the targets, applied to all)."""
    combined = torch.cat([w2c.double(), w2c_ref.double()])
    rel = combined @ rigid_inverse(combined[0:1])
    out = _recentre_and_scale(rigid_inverse(rel), len(w2c), camera_scale)
    return out[: len(w2c)], out[len(w2c):]


def camera_codes(w2c: torch.Tensor) -> torch.Tensor:
    """Per camera ``[N,7]``: the w2c rotation as a unit quaternion, real part first (w, x, y, z) with w >= 0, then
    the w2c translation — ``matrix_to_quaternion`` + translation as ``load_single_view_data`` builds them."""
    from scipy.spatial.transform import Rotation

    w2c = w2c.detach().cpu().double()
    if len(w2c) == 0:
        return w2c.new_zeros(0, 7)
    xyzw = torch.from_numpy(Rotation.from_matrix(w2c[:, :3, :3].numpy()).as_quat())
    wxyz = torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=1)
    wxyz = torch.where(wxyz[:, :1] < 0, -wxyz, wxyz)
    return torch.cat([wxyz, w2c[:, :3, 3]], dim=1)


def camera_qt(w2c: torch.Tensor, w2c_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(camera_qt [1,F,7], camera_qt_ref [1,R,7])`` float32: the codes of targets and references after the
    unified normalisation (memory variants)."""
    tgt, ref = unified_normalized_w2c(w2c, w2c_ref)
    return camera_codes(tgt).float()[None], camera_codes(ref).float()[None]


def plucker_map(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """Plücker rays ``[6,F,H',W']`` of the cameras as given, laid out as ``batch_sample_rays`` + ``embed_rays``
    (release: models/camera.py): pixel (i, j) is the point x = j - 0.5, y = i + 0.5 (sic, the grid the weights were
    trained with), d = normalize(R_c2w K^-1 (x, y, 1)), o = the camera centre, channels (d, o x d). ``stride`` keeps
    rows and columns 0, stride, 2*stride, ... (each pixel's value depends on that pixel only). A non-finite result
    becomes all zeros, as the release does."""
    K = K.double()
    c2w = rigid_inverse(w2c.double())
    x = torch.arange(0, width, stride, dtype=torch.float64) - 0.5
    y = torch.arange(0, height, stride, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    pix = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)  # [H',W',3]
    cam_dirs = torch.einsum("fij,hwj->fhwi", torch.linalg.inv(K), pix)
    d = F.normalize(torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], cam_dirs), dim=-1)
    o = c2w[:, None, None, :3, 3].expand_as(d)
    emb = torch.cat([d, torch.cross(o, d, dim=-1)], dim=-1).permute(3, 0, 1, 2).float().contiguous()
    if not bool(torch.isfinite(emb).all()):
        emb = torch.zeros_like(emb)
    return emb


def camera_embedding(K: torch.Tensor, w2c: torch.Tensor, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """``get_camera_embedding(K, w2c, F, H, W, normalize=True, is_w2c=True)`` of release: models/camera.py: the
    Plücker map ``[1,6,F,H',W']`` of the centre-normalised trajectory (targets only)."""
    return plucker_map(K, center_normalized_w2c(w2c), height, width, stride)[None]


# ---- renders and masks -------------------------------------------------------------------------------

def splat_radius(height: int, width: int) -> int:
    """The half-size in pixels of the engine's square point splats that follows the release's render radius
    (0.008 in PyTorch3D NDC, where the shorter image side spans 2): ``round(0.004 * min(H, W))``, at least 1 —
    2 at 480 rows. Smaller splats leave combs of one-pixel gaps between points where the official renders
    (radius ~2 px, 20 points per pixel) have none."""
    return max(1, int(round(RENDER_RADIUS_NDC / 2 * min(height, width))))


def signed(image: torch.Tensor) -> torch.Tensor:
    """[0,1] -> [-1,1] (torchvision ``ToTensor()(x) * 2 - 1``)."""
    return image.float() * 2 - 1


def render_video_and_mask(image: Image.Image, render_image: torch.Tensor,
                          covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GGM inputs from one of the engine's cache renders (``render_image [F,3,H,W]`` in [0,1], ``covered``
    bool ``[F,H,W]``), as ``multi_gpu_point_rendering(..., replace_first_frame=True)`` (release: src/pointcloud.py)
    makes them: video ``[1,3,F,H,W]`` in [-1,1] with the background 0 (mid-grey) in holes and frame 0 = the input image;
    mask ``[1,1,F,H,W]`` 1 where no point landed (``zbuf == -1``), frame 0 all 0."""
    covered = covered.bool().cpu()
    video = torch.where(covered[:, None], signed(render_image.cpu()), torch.zeros(()))
    video[0] = signed(pil_to_tensor(image))
    mask = (~covered).float()
    mask[0] = 0
    return video.clamp(-1, 1).permute(1, 0, 2, 3)[None].contiguous(), mask[None, None].contiguous()


def read_official_render(folder: PathLike, image: Image.Image, nframe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``render.mp4`` + ``render_mask.mp4`` of an official trajectory folder, read the way
    ``load_mutli_traj_dataset`` (release: src/data_utils.py) reads them: frames to [-1,1], bicubic resize to the image's
    size, frame 0 = the image, clipped to [-1,1]; mask channel 0, nearest resize, binarised at 0.5; both
    subsampled to ``nframe`` keyframes. Returns ``(video [1,3,F,H,W], mask [1,1,F,H,W])``."""
    from engine.outputs import OutputError, read_video

    folder = Path(folder)
    w, h = image.size
    try:
        frames = read_video(folder / "render.mp4")
        masks = read_video(folder / "render_mask.mp4")
    except OutputError as e:
        raise ClipInputError(f"The render folder {folder.name}: {str(e).rstrip('.')}.") from None
    video = F.interpolate(signed(frames), size=(h, w), mode="bicubic")
    video[0] = signed(pil_to_tensor(image))
    video = video.clamp(-1, 1)
    mask = F.interpolate(masks[:, 0:1], size=(h, w), mode="nearest")
    mask = (mask >= 0.5).float()
    video = video[torch.as_tensor(keyframe_indices(len(video), nframe))]
    mask = mask[torch.as_tensor(keyframe_indices(len(mask), nframe))]
    return video.permute(1, 0, 2, 3)[None].contiguous(), mask.permute(1, 0, 2, 3)[None].contiguous()


def check_render_dir(folder: PathLike) -> Path:
    """An official pre-rendered trajectory folder: ``camera.json``, and ``render.mp4`` / ``render_mask.mp4`` that
    decode to one frame per camera (checked before anything is written)."""
    from engine.outputs import OutputError, read_video

    folder = Path(folder)
    if not folder.is_dir():
        raise ClipInputError(f"The render folder {folder.name} does not exist.")
    missing = [n for n in RENDER_FILES if not (folder / n).is_file()]
    if missing:
        raise ClipInputError(f"The render folder {folder.name} lacks {', '.join(missing)}; it needs "
                             f"{', '.join(RENDER_FILES)} as the official examples have them.")
    count = len(Cameras.from_json(folder / "camera.json"))
    for name in RENDER_FILES[1:]:
        try:
            frames = len(read_video(folder / name))
        except OutputError as e:
            raise ClipInputError(f"The render folder {folder.name}: {str(e).rstrip('.')}.") from None
        if frames != count:
            raise ClipInputError(f"The render folder {folder.name} has {frames} frames in {name} for {count} cameras; "
                                 "it needs one per camera.")
    return folder


def example_prompt(image: Optional[PathLike] = None, render_dir: Optional[PathLike] = None) -> Optional[str]:
    """The caption the official examples come with: ``traj_caption.json["prompt"]`` of a trajectory folder
    (release: run_multi_traj.py), else ``prompt.json["long caption"]`` beside a photo
    (release: run_camera_control.py)."""
    candidates = []
    if render_dir is not None:
        candidates.append((Path(render_dir) / "traj_caption.json", "prompt"))
    if image is not None:
        candidates.append((Path(image).parent / "prompt.json", "long caption"))
    for path, key in candidates:
        try:
            text = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(text, str) and text.strip():
            return text
    return None


def colour_coded_pointmaps(*pointmaps: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """World XYZ maps ``[N,3,H,W]`` -> images in [-1,1] for the VAE, normalised per axis over all maps together.

    The engine's own input for the paper's branch-form memory (the released checkpoints have no weights that
    read pointmaps): a shared box keeps the colour of a 3D point the same in targets and references, which is
    what lets the memory match them. Non-finite points become the box's lower corner.
    """
    present = [p for p in pointmaps if p is not None]
    if not present:
        return [None for _ in pointmaps]
    flat = torch.cat([p.float().permute(1, 0, 2, 3).reshape(3, -1) for p in present], dim=1)
    finite = torch.isfinite(flat).all(0)
    pts = flat[:, finite] if finite.any() else flat.new_zeros(3, 1)
    lo, hi = pts.min(dim=1).values.view(1, 3, 1, 1), pts.max(dim=1).values.view(1, 3, 1, 1)
    out = []
    for p in pointmaps:
        if p is None:
            out.append(None)
            continue
        q = ((p.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        out.append(signed(torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)))
    return out


# ---- one clip ----------------------------------------------------------------------------------------

@dataclass
class ClipConditions:
    """One clip's conditions exactly as the official inference hands them to its pipeline (before any VAE).

    ``image``: the bucket-sized input view (PIL, uint8 RGB; CLIP reads it as is, the VAE as [-1,1]).
    ``extrinsics [F,4,4]``: the keyframes' w2c (subsampled, not normalised); ``intrinsics [F,3,3]``: K at H x W.
    ``render_video [1,3,F,H,W]`` in [-1,1]; ``render_mask [1,1,F,H,W]`` 1 = hole; ``camera_embedding [1,6,F,H,W]``.
    Memory variants: ``camera_qt [1,F,7]``, ``camera_qt_ref [1,R,7]``, ``ref_index [R]`` and ``reference_video
    [1,3,R,H,W]`` in [-1,1]. ``pointmaps [F,3,H,W]`` / ``reference_pointmaps [R,3,H,W]``: world XYZ for the
    paper's branch-form memory only. ``stride`` > 1: the per-pixel maps (video, mask, Plücker) hold only every
    ``stride``-th row and column (for inspection; a model needs stride 1).
    """

    image: Image.Image
    extrinsics: torch.Tensor
    intrinsics: torch.Tensor
    render_video: torch.Tensor
    render_mask: torch.Tensor
    camera_embedding: torch.Tensor
    camera_qt: Optional[torch.Tensor] = None
    camera_qt_ref: Optional[torch.Tensor] = None
    ref_index: Optional[torch.Tensor] = None
    reference_video: Optional[torch.Tensor] = None
    pointmaps: Optional[torch.Tensor] = None
    reference_pointmaps: Optional[torch.Tensor] = None
    stride: int = 1

    @property
    def num_frames(self) -> int:
        return int(self.render_video.shape[2])

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the clip's frames."""
        return int(self.image.size[1]), int(self.image.size[0])

    @property
    def num_references(self) -> int:
        return 0 if self.reference_video is None else int(self.reference_video.shape[2])

    def image_tensor(self) -> torch.Tensor:
        """The input view ``[3,H,W]`` in [-1,1] (the release's ``video_processor.preprocess`` of the PIL image)."""
        return signed(pil_to_tensor(self.image))

    def render_frames(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Back to the engine's convention: ``(render [F,3,H,W] in [0,1], covered bool [F,H,W])``."""
        return (self.render_video[0].permute(1, 0, 2, 3) + 1) / 2, self.render_mask[0, 0] < 0.5

    def tensors(self) -> dict[str, torch.Tensor]:
        """The conditions as named float32 tensors (``ref_index`` int64), the keys the transformer's inputs have."""
        out = {
            "extrinsics": self.extrinsics.float(),
            "intrinsics": self.intrinsics.float(),
            "render_video": self.render_video.float(),
            "render_mask": self.render_mask.float(),
            "camera_embedding": self.camera_embedding.float(),
        }
        for key in ("camera_qt", "camera_qt_ref"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).float()
        if self.ref_index is not None:
            out["ref_index"] = self.ref_index.long()
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: PathLike, extra: Optional[dict] = None) -> Path:
        """Write ``tensors()`` and the ``extra`` named tensors to a safetensors file (atomically; metadata: the full
        height and width, the stride)."""
        from safetensors.torch import save_file

        from engine.atomicio import atomic_path

        path = Path(path)
        meta = {"height": str(self.size[0]), "width": str(self.size[1]), "stride": str(self.stride)}
        tensors = {**self.tensors(), **{k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def _check_size(height: int, width: int) -> None:
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ClipInputError(f"Frame size {width}x{height} must be a multiple of {SIZE_MULTIPLE} in both "
                                "directions; use one of the model's buckets.")


def build_conditions(image: Image.Image, cameras: Cameras, render_video: torch.Tensor, render_mask: torch.Tensor,
                     references: Optional[References] = None, pointmaps: Optional[torch.Tensor] = None,
                     memory: bool = True, stride: int = 1) -> ClipConditions:
    """Assemble a clip's conditions from official-convention render video and mask (``render_video_and_mask`` or
    ``read_official_render``) and the keyframe cameras at the clip's size. ``memory`` (the memory variants) adds
    the camera codes after the unified normalisation and, with ``references``, the reference frames in [-1,1].
    ``stride`` > 1 keeps every ``stride``-th pixel row and column of the per-pixel maps (the Plücker map is computed
    there only)."""
    w, h = image.size
    _check_size(h, w)
    f = render_video.shape[2]
    if len(cameras) != f or render_mask.shape[2] != f:
        raise ClipInputError(f"{len(cameras)} cameras, {f} render frames and {render_mask.shape[2]} mask frames "
                             "were given; a clip needs one of each per keyframe.")
    if (cameras.width, cameras.height) != (w, h):
        cameras = cameras.resized(w, h)
    s = int(stride)
    cond = ClipConditions(
        image=image, extrinsics=cameras.w2c.float(), intrinsics=cameras.K.float(),
        render_video=render_video[..., ::s, ::s].float().contiguous(),
        render_mask=render_mask[..., ::s, ::s].float().contiguous(),
        camera_embedding=camera_embedding(cameras.K, cameras.w2c, h, w, s),
        pointmaps=pointmaps, stride=s,
    )
    if not memory:
        return cond
    refs = references if references is not None and len(references) > 0 else None
    ref_w2c = refs.cameras.w2c if refs is not None else cameras.w2c.new_zeros(0, 4, 4)
    cond.camera_qt, qt_ref = camera_qt(cameras.w2c, ref_w2c)
    if refs is not None:
        ref = refs.images.float().cpu()
        if tuple(ref.shape[-2:]) != (h, w):
            raise ClipInputError(f"Reference images are {tuple(ref.shape[-2:])} but the clip is {(h, w)}; "
                                 "give references at the clip's size.")
        cond.camera_qt_ref = qt_ref
        cond.ref_index = torch.as_tensor(refs.ref_index, dtype=torch.long).reshape(-1)
        cond.reference_video = signed(ref).permute(1, 0, 2, 3)[None].contiguous()
        cond.reference_pointmaps = refs.pointmaps
    return cond


def conditions_from_render(image: torch.Tensor, cameras: Cameras, render_image: torch.Tensor,
                           covered: torch.Tensor, references: Optional[References] = None,
                           pointmaps: Optional[torch.Tensor] = None, memory: bool = True,
                           stride: int = 1) -> ClipConditions:
    """A clip's conditions from the engine's own cache render (``image [3,H,W]`` and ``render_image [F,3,H,W]`` in
    [0,1], ``covered`` bool ``[F,H,W]``), as the release's single-view path builds them."""
    pil = to_pil(image)
    video, mask = render_video_and_mask(pil, render_image, covered)
    return build_conditions(pil, cameras, video, mask, references, pointmaps, memory, stride)


def conditions_from_render_dir(folder: PathLike, image: torch.Tensor, cameras: Cameras, nframe: int,
                               references: Optional[References] = None, pointmaps: Optional[torch.Tensor] = None,
                               memory: bool = True, stride: int = 1) -> ClipConditions:
    """A clip's conditions from an official pre-rendered trajectory folder (``render.mp4``, ``render_mask.mp4``)
    with ``cameras`` its keyframe cameras at the image's size (``image [3,H,W]`` in [0,1], the bucket image)."""
    pil = to_pil(image)
    video, mask = read_official_render(folder, pil, nframe)
    if video.shape[2] != len(cameras) or mask.shape[2] != len(cameras):
        raise ClipInputError(f"The render folder {Path(folder).name} holds {video.shape[2]} render and "
                                f"{mask.shape[2]} mask frames for {len(cameras)} cameras; they must match.")
    return build_conditions(pil, cameras, video, mask, references, pointmaps, memory, stride)


def official_cameras(cameras: Cameras, image_size: tuple[int, int], size: tuple[int, int], nframe: int) -> Cameras:
    """A camera file's trajectory as the release uses it: subsampled to ``nframe`` keyframes, intrinsics read as
    pixels of the input image (``image_size = (h0, w0)``) and rescaled to the bucket ``size = (h, w)``."""
    (h0, w0), (h, w) = image_size, size
    cams = select_keyframes(cameras, nframe)
    k = rescale_intrinsics(cams.K, (h0, w0), (h, w))
    return replace(cams, K=k, width=int(w), height=int(h), meta=None)
