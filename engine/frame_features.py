"""What the release's reference selector sees of a memory frame besides its camera: DINOv2-base pooled features and
an image-quality score (release: src/retrieval_wm.py ``CameraSelector``). ``engine.geometry.retrieval`` chooses
with them (``select_frames``) when a clip picks more than 8 references.

Features: the frame as 8-bit RGB through the DINOv2 image processor (``DINOV2_PROCESSOR``: shortest side to 256,
bicubic; centre crop 224 x 224; x / 255; ImageNet mean and standard deviation), then ``Dinov2Model``'s
``pooler_output`` (the final layer-normed class token; 768 values for ``facebook/dinov2-base``).

Quality (``image_quality``): ``0.4 log(1 + var(Laplacian)) + 0.3 entropy + 0.3 std / 128`` of the grey image, the
entropy in bits over its 256-level histogram (each bin + 1e-10). The release converts its RGB frames with OpenCV's
BGR-to-grey weights, so red is weighted 0.114 and blue 0.299; kept as it is, since the release chose with it.

Weights come from the Hugging Face cache (or a local folder) only: nothing is downloaded here, so a scene never
waits on the network for them. Without them the selector runs on camera pose and quality alone, and ``announce``
gets one line saying so (as ``engine.depth`` announces its fallbacks).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional, Union

import cv2
import numpy as np
import torch

from engine.geometry.retrieval import FrameFeatures
from engine.hub import DINOV2_REPO
from engine.images import to_uint8

# facebook/dinov2-base's preprocessor_config.json (a BitImageProcessor): the settings its features were made with.
DINOV2_PROCESSOR = {
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # 3 = PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
BATCH_SIZE = 8


def image_quality(images: np.ndarray) -> np.ndarray:
    """``[N]`` float64 quality scores (module doc) of 8-bit RGB frames ``[N,H,W,3]``."""
    scores = []
    for rgb in np.asarray(images, dtype=np.uint8):
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_BGR2GRAY)  # the release's channel order (module doc)
        sharpness = cv2.Laplacian(grey, cv2.CV_64F).var()
        hist = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()
        hist = hist / hist.sum() + 1e-10
        entropy = -np.sum(hist * np.log2(hist))
        scores.append(0.4 * np.log1p(sharpness) + 0.3 * entropy + 0.3 * (grey.std() / 128.0))
    return np.asarray(scores, dtype=np.float64)


class FrameDescriber:
    """``images [N,3,H,W]`` in [0,1] -> ``FrameFeatures``: DINOv2 pooled features (None without a model: the
    pose-only fallback) and quality scores."""

    def __init__(self, model=None, processor=None, batch_size: int = BATCH_SIZE):
        if (model is None) != (processor is None):
            raise ValueError("A frame describer needs both a DINOv2 model and its image processor, or neither.")
        self.model = None if model is None else model.eval()
        self.processor = processor
        self.batch_size = batch_size

    @property
    def source(self) -> str:
        return "pose and quality only" if self.model is None else "DINOv2 + pose + quality"

    @torch.no_grad()
    def features(self, pixels: np.ndarray) -> np.ndarray:
        """``[N,D]`` float32 ``pooler_output`` of 8-bit RGB frames ``[N,H,W,3]``."""
        param = next(self.model.parameters())
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = self.processor(images=list(pixels[start : start + self.batch_size]), return_tensors="pt")
            values = batch["pixel_values"].to(device=param.device, dtype=param.dtype)
            out.append(self.model(pixel_values=values).pooler_output.float().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, images: torch.Tensor) -> FrameFeatures:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(getattr(images, "shape", ()))
            raise ValueError(f"Frames to describe must be a tensor [N,3,H,W]; got {shape}.")
        pixels = to_uint8(images)
        return FrameFeatures(None if self.model is None else self.features(pixels), image_quality(pixels))


def _check_present(spec: str) -> None:
    """Raise (as ``from_pretrained`` would, later) when ``spec`` is neither a folder nor a hub id whose
    ``config.json`` the Hugging Face cache holds: nothing could be loaded, so transformers need not be imported."""
    if not Path(spec).is_dir():
        from engine.hub import hub_file

        hub_file(spec, "config.json", cache_only=True)  # HubFileUnavailable when the cache lacks it


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def load_frame_describer(spec: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu",
                         announce: Optional[Callable[[str], None]] = print) -> FrameDescriber:
    """The selector's frame describer: DINOv2 from ``spec`` (a hub id read from the local cache only, or a folder;
    default ``DINOV2_REPO``), loaded once per process and device. When it cannot be read, the pose-only describer,
    and ``announce`` gets one line saying why."""
    spec = str(spec or DINOV2_REPO)
    key = (spec, str(torch.device(device)))
    with _LOADED_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        try:
            _check_present(spec)  # before importing transformers: seconds spent for nothing when the weights are absent
            from transformers import AutoImageProcessor, Dinov2Model

            # The release asks for the fast (torchvision) processor: `use_fast=True`, `backend="torchvision"` here.
            processor = AutoImageProcessor.from_pretrained(spec, local_files_only=True, backend="torchvision")
            model = Dinov2Model.from_pretrained(spec, local_files_only=True).to(torch.device(device))
            describer = FrameDescriber(model, processor)
        except Exception as e:  # not cached, damaged, another architecture: all mean "not available here"
            if announce is not None:
                announce(f"Reference selector: DINOv2 weights '{spec}' are not in the Hugging Face cache or cannot be "
                         f"read ({e.__class__.__name__}); more than 8 references are narrowed by camera pose and "
                         "image quality alone.")
            describer = FrameDescriber()
        _LOADED[key] = describer
        return describer
