"""One WorldStereo transformer forward: time, peak memory, achieved TFLOP/s against the analytic FLOP count.

    python bench/transformer.py                      # full 14B size in bf16 on CUDA when present, else tiny on CPU
    python bench/transformer.py --size full --refs 8 # with 8 stitched references
    python bench/transformer.py --size tiny          # the CI-sized case (random tiny model, CPU)

Weights are random: the speed of a forward does not depend on their values. FLOPs: bench/flops.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import worldstereo_flops  # noqa: E402

from engine.constants import IMAGE_TOKENS, KEYFRAMES, LATENT_CHANNELS, TEXT_TOKENS, VAE_SCALE  # noqa: E402
from engine.models.loading import full_size_transformer_config, tiny_transformer_config  # noqa: E402
from engine.models.transformer import WorldStereoTransformer  # noqa: E402


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def build(size: str, variant: str, device: torch.device, dtype: torch.dtype):
    cfg, base = (full_size_transformer_config if size == "full" else tiny_transformer_config)(variant)
    # Built directly on the device in the target dtype: a 17.6B-parameter model never exists in float32 on the host.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = WorldStereoTransformer.from_checkpoint_config(cfg, base)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), cfg, base


def inputs(base: dict, frames: int, height: int, width: int, refs: int, device, dtype, text_tokens: int) -> dict:
    g = torch.Generator("cpu").manual_seed(0)
    h, w = height // VAE_SCALE, width // VAE_SCALE

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    kw = dict(
        hidden_states=rnd(1, base["in_channels"], frames, h, w),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=rnd(1, text_tokens, base["text_dim"]),
        encoder_hidden_states_image=rnd(1, IMAGE_TOKENS, base["image_dim"]),
        render_latent=rnd(1, LATENT_CHANNELS, frames, h, w),
        render_mask=(torch.rand(1, 1, frames, height, width, generator=g) > 0.3).to(device=device, dtype=dtype),
        camera_embedding=rnd(1, 6, frames, height, width),
        camera_qt=rnd(1, frames, 7),
    )
    if refs:
        kw.update(reference_latent=rnd(1, LATENT_CHANNELS, refs, h, w),
                  ref_index=torch.arange(refs, device=device) % (frames - 1),
                  camera_qt_ref=rnd(1, refs, 7))
    return kw


def si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="full" if cuda else "tiny")
    p.add_argument("--variant", default="worldstereo-memory-dmd")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if cuda else "fp32")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--refs", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    full = args.size == "full"
    frames = args.frames or (KEYFRAMES if full else 5)
    height = args.height or (480 if full else 64)
    width = args.width or (768 if full else 96)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    model, cfg, base = build(args.size, args.variant, device, dtype)
    text_tokens = TEXT_TOKENS if full else 16
    kw = inputs(base, frames, height, width, args.refs, device, dtype, text_tokens)
    flops = worldstereo_flops(base, cfg.controlnet_cfg.to_dict(), frames, height, width, args.refs,
                              text_tokens=text_tokens)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        model(**kw)  # warm-up
        sync()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = model(**kw)
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape == (1, LATENT_CHANNELS, frames, height // VAE_SCALE, width // VAE_SCALE)
    assert torch.isfinite(out.float()).all()
    best = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters()) / 1e9
    rows = [
        ("machine", machine(device)),
        ("model", f"{args.size} {args.variant}, {si(params * 1e9, '')}parameters, {args.dtype}"),
        ("input", f"{frames} keyframes x {height}x{width}, {args.refs} references, batch 1, {flops['tokens']} tokens"),
        ("FLOPs / forward", f"{si(flops['total'], 'FLOP')} (backbone {si(flops['backbone'], 'FLOP')}, "
                            f"camera branch {si(flops['branch'], 'FLOP')})"),
        ("time / forward (median)", f"{best * 1e3:.1f} ms over {args.repeats}"),
        ("achieved", si(flops["total"] / best, "FLOP/s")),
        ("peak GPU memory", "n/a on CPU" if device.type != "cuda" else f"{peak:.1f} GiB"),
    ]
    width_ = max(len(k) for k, _ in rows)
    print("| " + "what".ljust(width_) + " | value |\n|" + "-" * (width_ + 2) + "|---|")
    for k, v in rows:
        print(f"| {k.ljust(width_)} | {v} |")


if __name__ == "__main__":
    main()
