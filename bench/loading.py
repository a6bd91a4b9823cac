"""Peak host memory while loading a partial checkpoint over a sharded base, as the released camera files load.

    python bench/loading.py                    # a base of about 500 MB in float32 shards, a bf16 camera-style file
    python bench/loading.py --width 256 --layers 4 --shard-mb 8   # the CI size (tests/test_bench.py)

Writes, in a temporary folder, a base model's `transformer/` with diffusers' own `save_pretrained(max_shard_size=)`
(float32, several shards and their index, as the real 14 float32 shards) and a checkpoint whose `model.safetensors`
holds the branch, the modules the base lacks and every block's self-attention in bf16 (the released camera file's
kind of subset). Then, in a fresh process each, it loads the model in bf16 two ways and measures the growth of the
process's peak resident memory (VmHWM) over what the imports left:

- `load_transformer` (this engine): the model built on meta, each tensor filled from one mapped file at a time;
- the release's way: the base transformer with `from_pretrained(torch_dtype=bf16)`, then the whole file read into a
  state dict and loaded over it (`strict=False`).

The target: the engine's peak stays below the model's own size plus one shard plus 15 %. Prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer import machine  # noqa: E402

from engine.models.loading import WEIGHTS_NAME, save_checkpoint, tiny_transformer_config  # noqa: E402

VARIANT = "worldstereo-camera"
MARGIN = 1.15

CHILD = r"""
import json, sys, time
import torch
from engine.models.loading import load_transformer
from engine.models.transformer import WorldStereoTransformer

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

# The libraries a load imports on its way, imported first: their code is the same few MB at every model size.
import accelerate.utils, huggingface_hub, safetensors.torch  # noqa: E401,F401
from engine.models import weightfiles  # noqa: F401

folder, way = sys.argv[1], sys.argv[2]
before = status()
t0 = time.perf_counter()
if way == "engine":
    model = load_transformer(folder, dtype=torch.bfloat16, announce=lambda _: None)
else:  # the release's way (release: models/worldstereo_wrapper.py _load_transformer)
    from safetensors.torch import load_file
    from engine.models.config import WorldStereoConfig
    config = WorldStereoConfig.from_json(folder + "/config.json", variant="worldstereo-camera")
    model = WorldStereoTransformer.from_pretrained(folder + "/base_model", subfolder="transformer",
                                                   worldstereo=config.to_dict(), torch_dtype=torch.bfloat16)
    weights = load_file(folder + "/model.safetensors")
    model.load_state_dict(weights, strict=False)
    del weights
seconds = time.perf_counter() - t0
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "after": status(), "seconds": seconds, "model_bytes": size}))
"""


def write_weights(folder: Path, width: int, layers: int, shard_mb: float) -> dict:
    """The base (float32 shards) and the bf16 partial checkpoint; returns their sizes."""
    from diffusers import WanTransformer3DModel

    from engine.models.tiny import checkpoint_keys
    from engine.models.transformer import WorldStereoTransformer, backbone_init_kwargs

    cfg, base = tiny_transformer_config(VARIANT)
    heads = max(1, width // 128)
    base.update(num_attention_heads=heads, attention_head_dim=width // heads, ffn_dim=4 * width, num_layers=layers,
                text_dim=width, added_kv_proj_dim=width, freq_dim=256)
    cn = cfg.controlnet_cfg
    cn.dim, cn.ffn_dim, cn.num_heads, cn.time_embed_dim, cn.conv_out_dim = width, 2 * width, heads, width, width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = WanTransformer3DModel(**backbone_init_kwargs(base)).eval()
        backbone.save_pretrained(folder / "base_model" / "transformer", max_shard_size=f"{shard_mb}MB")
        del backbone
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = WorldStereoTransformer.from_checkpoint_config(cfg, base).eval()
        finally:
            torch.set_default_dtype(previous)
    save_checkpoint(model, cfg, folder, keys=checkpoint_keys(model, VARIANT))
    shards = sorted((folder / "base_model" / "transformer").glob("*.safetensors"))
    return {"base_bytes": sum(p.stat().st_size for p in shards), "shards": len(shards),
            "shard_bytes": max(p.stat().st_size for p in shards),
            "checkpoint_bytes": (folder / WEIGHTS_NAME).stat().st_size}


def measure(folder: Path, way: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), way], capture_output=True, text=True,
                          timeout=900, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the {way} load failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["growth"] = report["after"]["VmHWM"] - report["before"]["VmHWM"]
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=768, help="backbone width (heads of 128)")
    p.add_argument("--layers", type=int, default=12, help="backbone blocks")
    p.add_argument("--shard-mb", type=float, default=100.0, help="max_shard_size of the base, in MB")
    p.add_argument("--skip-release", action="store_true", help="measure the engine's load only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ws-load-bench-") as tmp:
        folder = Path(tmp) / VARIANT
        t0 = time.perf_counter()
        sizes = write_weights(folder, args.width, args.layers, args.shard_mb)
        written = time.perf_counter() - t0
        ways = ["engine"] + ([] if args.skip_release else ["release"])
        results = {way: measure(folder, way) for way in ways}
    model_bytes = results["engine"]["model_bytes"]
    bound = model_bytes + sizes["shard_bytes"]
    mb = 1e6
    print(f"machine : {machine(torch.device('cpu'))}")
    print(f"weights : base {sizes['base_bytes'] / mb:.0f} MB float32 in {sizes['shards']} shards (largest "
          f"{sizes['shard_bytes'] / mb:.0f} MB); {WEIGHTS_NAME} {sizes['checkpoint_bytes'] / mb:.0f} MB bf16 (branch + "
          f"every block's self-attention); model {model_bytes / mb:.0f} MB in bf16; written in {written:.1f} s")
    print(f"target  : peak growth < (model + one shard) x {MARGIN} = {bound * MARGIN / mb:.0f} MB")
    print()
    print("| load | seconds | peak RSS growth MB | model + one shard MB | ratio | below target |")
    print("|---|---|---|---|---|---|")
    for way, r in results.items():
        ratio = r["growth"] / bound
        name = "load_transformer (meta, tensor by tensor)" if way == "engine" else \
            "release's way (from_pretrained + whole state dict)"
        print(f"| {name} | {r['seconds']:.1f} | {r['growth'] / mb:.0f} | {bound / mb:.0f} | {ratio:.2f} | "
              f"{'yes' if ratio < MARGIN else 'no'} |")
    return {"sizes": sizes, "results": results, "bound": bound}


if __name__ == "__main__":
    main()
