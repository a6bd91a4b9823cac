"""Per denoising step and per clip, for each runtime backend: time, peak memory, TFLOP/s, MFU, speed-up over eager.

    python bench/step.py --tiny                      # CI size: tiny random model on the CPU (eager, onnxruntime)
    python bench/step.py --full                      # 14B size, random weights, bf16 on CUDA (eager, compile)
    python bench/step.py --full --backends eager,compile,tensorrt --graphs exported/dmd-trt

A step is one transformer forward: batch 1 for the 4-step DMD sampler, batch 2 for 40-step UniPC with CFG (both
halves in one forward, as the pipeline batches them). Clip times are DiT-only: steps × step time; text/image/VAE
encoding and VAE decoding are not included. Inputs: 21 keyframes at 480×768 (tiny: 21 at 64×96), 0 and 8
stitched references. Weights are random (speed does not depend on their values).

FLOPs (bench/flops.py, multiply-add = 2): per backbone block 2·params·tokens for the linear layers
(8·L·d² self-attention q/k/v/o, 4·L·d² cross-attention q/o, 4·(512+257)·d² cross k/v, 4·L·d·ffn), plus
4·L²·d for the self-attention score and value products over all L tokens (references included) and
4·L·(512+257)·d for the cross-attention products; the camera branch likewise at its width over target tokens.
Wan2.1-14B at 30240 tokens: 1.49 PFLOP/forward, 2.46 PFLOP with 8 references (printed below as a check).
MFU = achieved FLOP/s ÷ the device's measured dense matmul rate (bf16 on CUDA, fp32 on a CPU), measured here.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flops import worldstereo_flops  # noqa: E402
from transformer import build, inputs, machine  # noqa: E402

from engine.constants import IMAGE_TOKENS, KEYFRAMES, MAX_REFERENCES, TEXT_TOKENS, VAE_SCALE  # noqa: E402
from engine.models.loading import full_size_transformer_config  # noqa: E402
from engine.runtime import make_backend  # noqa: E402

DMD_STEPS, CFG_STEPS = 4, 40
TRT_COMMAND = ("pip install tensorrt && python -m export --engine worldstereo-memory-dmd --weights DIR --format tensorrt "
               "--out exported/dmd-trt --height 480 --width 768 --frames 21 --refs 8 --precision bf16 && "
               "python bench/step.py --full --backends eager,tensorrt --graphs exported/dmd-trt")


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Dense matmul FLOP/s of this device: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def batched(kw: dict, b: int) -> dict:
    if b == 1:
        return kw
    out = {}
    for k, v in kw.items():
        if k == "timestep":
            out[k] = v.reshape(-1)[:1].expand(b)
        elif k == "ref_index":
            out[k] = v
        elif torch.is_tensor(v):
            out[k] = v.expand(b, *v.shape[1:]).contiguous()
        else:
            out[k] = v
    return out


def time_step(backend, kw: dict, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory GiB) of one forward; CPU memory is the process's peak resident size."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        backend(**kw)  # warm-up (and compilation)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend(**kw)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return sorted(times)[len(times) // 2], peak


def make(name: str, model, args, graphs_dir):
    opts = {}
    if name == "compile" and args.cuda_graphs:
        opts["cuda_graphs"] = True
    return make_backend(name, model, graphs_dir=graphs_dir, fallback=False, **opts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (CI size)")
    size.add_argument("--full", action="store_true", help="14B size, random weights, bf16 on CUDA")
    p.add_argument("--backends", help="comma list (default: tiny eager,onnxruntime; full eager,compile)")
    p.add_argument("--graphs", type=Path, help="exported graphs/engines for onnxruntime/tensorrt (tiny: exported here)")
    p.add_argument("--refs", default="0,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-graphs", action="store_true", help="compile backend with mode='reduce-overhead'")
    p.add_argument("--variant", default="worldstereo-memory-dmd")
    args = p.parse_args()

    full = args.full
    if full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA GPU (the 14B model is 35 GB in bf16); on this machine run --tiny.")
    device = torch.device("cuda" if full else "cpu")
    dtype = torch.bfloat16 if full else torch.float32
    frames, height, width = (KEYFRAMES, 480, 768) if full else (KEYFRAMES, 64, 96)
    backends = (args.backends or ("eager,compile" if full else "eager,onnxruntime")).split(",")
    refs_list = [int(r) for r in args.refs.split(",")]

    model, cfg, base = build("full" if full else "tiny", args.variant, device, dtype)
    rate = matmul_rate(device, dtype, 8192 if full else 1024, 20 if full else 5)
    graphs_dir = args.graphs
    if "onnxruntime" in backends and graphs_dir is None and not full:
        from export.api import export_onnx
        from export.graphs import ExportShape

        scratch = tempfile.TemporaryDirectory(prefix="ws-graphs-")  # removed when main() returns
        graphs_dir = Path(scratch.name)
        export_onnx(model, graphs_dir, ExportShape(frames=frames, height=height // VAE_SCALE, width=width // VAE_SCALE,
                                                   refs=2, image_tokens=IMAGE_TOKENS),
                    engine="tiny-random", log=lambda s: None)

    print(f"machine: {machine(device)}")
    print(f"model: {'14B' if full else 'tiny'} {args.variant}, random weights, {str(dtype).replace('torch.', '')}; "
          f"input {frames} keyframes x {height}x{width}; measured {'bf16' if full else 'fp32'} matmul "
          f"{rate / 1e12:.2f} TFLOP/s")
    _, wan14b = full_size_transformer_config()
    check, check8 = (worldstereo_flops(wan14b, {}, KEYFRAMES, 480, 768, r) for r in (0, MAX_REFERENCES))
    print(f"FLOP check (Wan2.1-14B backbone, {KEYFRAMES}x480x768): {check['backbone'] / 1e15:.2f} PFLOP at "
          f"{check['tokens']} tokens, {check8['backbone'] / 1e15:.2f} PFLOP with {MAX_REFERENCES} refs at "
          f"{check8['tokens']} tokens")
    header = ("| backend | refs | step b1 (ms) | step b2 (ms) | DMD clip 4x b1 (s) | CFG clip 40x b2 (s) | "
              "peak mem (GiB) | TFLOP/s | MFU | speed-up vs eager |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    eager_b1: dict[int, float] = {}
    text_tokens = TEXT_TOKENS
    for refs in refs_list:
        kw1 = inputs(base, frames, height, width, refs, device, dtype, text_tokens)
        flops = worldstereo_flops(base, cfg.controlnet_cfg.to_dict(), frames, height, width, refs,
                                  text_tokens=text_tokens)["total"]
        for name in backends:
            try:
                backend = make(name, model, args, graphs_dir)
            except Exception as e:  # unavailable here: say so, with the command that measures it
                how = TRT_COMMAND if name == "tensorrt" else f"python bench/step.py {'--full' if full else '--tiny'} " \
                                                                 f"--backends {name}"
                print(f"| {name} | {refs} | not measured: {str(e).splitlines()[0]} Run: `{how}` | | | | | | | |")
                continue
            t1, m1 = time_step(backend, kw1, device, args.repeats)
            t2, m2 = time_step(backend, batched(kw1, 2), device, args.repeats)
            if name == "eager":
                eager_b1[refs] = t1
            achieved = flops / t1
            speedup = f"{eager_b1[refs] / t1:.2f}x" if refs in eager_b1 else "n/a"
            print(f"| {name} | {refs} | {t1 * 1e3:.1f} | {t2 * 1e3:.1f} | {DMD_STEPS * t1:.2f} | {CFG_STEPS * t2:.2f} | "
                  f"{max(m1, m2):.2f} | {achieved / 1e12:.3f} | {achieved / rate:.1%} | {speedup} |")
    if not full:
        print(f"| GPU (14B, bf16) | 0, 8 | not measured: no GPU here. Run: `python bench/step.py --full "
              f"--backends eager,compile` and `{TRT_COMMAND}` | | | | | | | |")
    print(f"date: {date.today().isoformat()}; clip times are DiT only (no encoders / VAE); "
          f"{'CPU memory = process peak RSS' if not full else 'GPU memory = torch max_memory_allocated'}")


if __name__ == "__main__":
    main()
