"""What a checkpoint is made of and what it needs, from file headers alone (``python -m engine inspect``).

For each variant of a checkpoint folder, of a ``--weights DIR`` root or of a hub repository: how many tensors and
parameters come from its ``model.safetensors``, how many from its base model's ``transformer/`` weights and how many
neither holds (the split a load prints); the files it needs with their sizes and what of them is still to be
downloaded (with the ``hf download`` lines); and the memory the engine will need. Only headers are read — a
safetensors file's first bytes, fetched alone from the hub when the file is not here — never a tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.hub import BASE_COMPONENT_FOLDERS, HUB_REPO, download_commands, looks_like_repo_id

from .config import VARIANTS, WorldStereoConfig
from .loading import CONFIG_NAME, WEIGHTS_NAME, WeightPlan, read_order, plan_weights
from .weightfiles import WeightFolder, WeightsNotFoundError, human_bytes, human_count, locate_base_model

# Bytes per parameter of each network as the engine loads it on a GPU (engine.pipeline.default_dtype: bf16; the VAE
# and the CLIP image encoder in float32, as engine.models.components.load_components loads them).
GPU_BYTES = {"text_encoder": 2, "image_encoder": 4, "vae": 4}


@dataclass
class VariantReport:
    """One variant: where it is, the plan of its weights, its files and its memory."""

    variant: str
    where: str
    base_where: str
    plan: WeightPlan
    files: dict[str, tuple[int, bool]] = field(default_factory=dict)  # "owner: name" -> (bytes, here)
    parameters: dict[str, int] = field(default_factory=dict)  # network -> parameters
    transformer_gpu_bytes: int = 0  # at bf16, float32 modules kept float32
    transformer_cpu_bytes: int = 0  # at float32 (a CPU run)
    mapped_bytes: int = 0  # the most the load maps at once

    def lines(self) -> list[str]:
        plan = self.plan
        total = {**plan.from_checkpoint, **plan.from_base}
        out = [f"{self.variant}: {self.where}",
               f"  base model: {self.base_where}",
               f"  transformer: {len(total)} tensors, {human_count(sum(i.numel for i in total.values()))} parameters: "
               f"{plan.split()}"]
        problem = plan.mismatch()
        if problem:
            out.append(f"  refused when loading: {problem}")
        need = sum(size for size, _ in self.files.values())
        missing = {name: size for name, (size, here) in self.files.items() if not here}
        out.append(f"  files needed: {len(self.files)}, {human_bytes(need)}; still to download: "
                   + (f"{len(missing)} file(s), {human_bytes(sum(missing.values()))}" if missing else "none"))
        gpu = {"transformer": self.transformer_gpu_bytes}
        gpu.update({name: n * GPU_BYTES[name] for name, n in self.parameters.items() if name in GPU_BYTES})
        parts = " + ".join(f"{name.replace('_', ' ')} {human_bytes(size)}" for name, size in gpu.items())
        out.append(f"  GPU memory for the weights (--offload none): {parts} = {human_bytes(sum(gpu.values()))} "
                   "(--offload model/group keep them in host memory instead)")
        out.append(f"  host memory while loading the transformer: at most {human_bytes(self.mapped_bytes)} of files "
                   f"mapped at once, plus the transformer itself on --device cpu "
                   f"({human_bytes(self.transformer_cpu_bytes)} in float32)")
        if missing:
            out += [f"  {line}" for line in download_commands(self.variant, bool(plan.from_base))]
        return out


def _variant_folders(source: str, variant: Optional[str]) -> list[tuple[str, WeightFolder]]:
    """(variant, its checkpoint folder) of a variant folder, a folder of variant folders, or a hub repository."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            name = variant or (path.name if path.name in VARIANTS else None)
            return [(name or path.name, WeightFolder(path, weights_name=WEIGHTS_NAME))]
        found = [v for v in ([variant] if variant else VARIANTS) if (path / v / CONFIG_NAME).is_file()]
        if not found:
            raise WeightsNotFoundError(f"{path} holds no {CONFIG_NAME} and no variant folder "
                                       f"({', '.join(VARIANTS)}); point to a checkpoint folder or the --weights root.")
        return [(v, WeightFolder(path / v, weights_name=WEIGHTS_NAME)) for v in found]
    if not looks_like_repo_id(source):
        raise WeightsNotFoundError(f"{source} is neither an existing folder nor a hub repository id like {HUB_REPO}.")
    return [(v, WeightFolder(source, v, weights_name=WEIGHTS_NAME)) for v in ([variant] if variant else VARIANTS)]


def _folder_files(folder: WeightFolder, owner: str, names: Optional[list[str]] = None) -> dict[str, tuple[int, bool]]:
    listing = folder.listing()
    chosen = listing if names is None else {n: listing[n] for n in names if n in listing}
    return {f"{owner}{name}": (size, folder.cached(name) is not None) for name, size in chosen.items()}


def inspect_variant(variant: str, checkpoint: WeightFolder) -> VariantReport:
    """The report of one variant's checkpoint folder, from headers."""
    from accelerate import init_empty_weights

    from .transformer import WorldStereoTransformer

    config = WorldStereoConfig.from_dict(checkpoint.read_json(CONFIG_NAME),
                                         variant=variant if variant in VARIANTS else None)
    anchor = Path(checkpoint.where) if checkpoint.local else None
    base_root = locate_base_model(config.base_model, anchor)
    base = WeightFolder(base_root, "transformer")
    with init_empty_weights(include_buffers=False):
        model = WorldStereoTransformer.from_checkpoint_config(config, base.read_json(CONFIG_NAME))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    plan = plan_weights(shapes, checkpoint, base, download=False)
    report = VariantReport(variant, checkpoint.where, base.where.rsplit("/transformer", 1)[0], plan)
    for key, shape in shapes.items():
        n = math.prod(shape)
        report.transformer_cpu_bytes += 4 * n
        report.transformer_gpu_bytes += n * (4 if any(m in key.split(".") for m in keep_fp32) else 2)
    report.mapped_bytes = max((sum({**plan.from_base, **plan.from_checkpoint}[k].nbytes for k in keys)
                               for _, keys in read_order(plan)), default=0)
    report.files.update(_folder_files(checkpoint, f"{checkpoint.where}/", [CONFIG_NAME, WEIGHTS_NAME]))
    base_top = WeightFolder(base_root)
    transformer_names = [CONFIG_NAME]
    if plan.from_base:
        index = [n for n in base.listing() if n.endswith(".index.json")]
        transformer_names += index + [Path(f).name for f in plan.base_files_read]
    report.files.update(_folder_files(base, f"{base.where}/", transformer_names))
    report.files.update(_folder_files(base_top, f"{base_root}/", ["model_index.json"]))
    for folder in BASE_COMPONENT_FOLDERS:
        part = WeightFolder(base_root, folder)
        report.files.update(_folder_files(part, f"{part.where}/"))
        if folder in GPU_BYTES:
            try:
                report.parameters[folder] = sum(i.numel for i in part.tensors(download=False).values())
            except WeightsNotFoundError:
                report.parameters[folder] = 0  # not here and the hub unreachable: counted as unknown
    return report


def inspect_checkpoints(source: str, variant: Optional[str] = None) -> list[VariantReport]:
    """Reports for every variant of ``source`` (a checkpoint folder, a ``--weights`` root or a hub repository id),
    or for ``variant`` alone."""
    return [inspect_variant(name, folder) for name, folder in _variant_folders(source, variant)]
