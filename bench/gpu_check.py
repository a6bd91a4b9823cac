"""The prepared GPU run (``bash bench/gpu_check.sh`` calls this): every measurement that needs a CUDA GPU, in one go.

Sections run one after another, each in its own process with its own time limit (a hung compile cannot take the
rest with it), most important first, under one overall deadline; results are written after each section to
``bench/gpu_results/<date>-<device>.json`` and ``.md``:

- ``env``: machine, versions, the measured dense bf16 matmul rate (the denominator of every "% of matmul" figure),
  and the point render on CUDA (1M points into 21 frames at 480x768).
- ``tests``: ``pytest -m gpu`` (the GPU-marked tests of tests/).
- ``forward``: one full-size (14B, random weights) bf16 transformer forward at 21x480x768, 0 and 8 references,
  eager: time, peak memory, achieved TFLOP/s against the analytic count (bench/flops.py) and its share of the
  matmul rate.
- ``clip-none``, ``clip-group``, ``clip-model``, ``clip-text-encoder``: a whole DMD clip at full size with random
  weights (UMT5-XXL, CLIP ViT-H/14, the Wan VAE, the 14B transformer; 8 references): text, image and VAE encoding,
  4 steps, decoding, per stage, with each GPU memory option: peak GPU memory and clip time, and the largest latent
  difference from the ``none`` clip.
- ``compile``: the forward under ``torch.compile`` (0, then 8 references): compile time and step time.

Random weights are built directly on the GPU in bf16 (seconds, not the minutes a CPU needs), from seeds, so every
section builds the same model. Without CUDA (or without torch) the plan is printed, nothing is measured, and the
exit status is 0. Uses only what torch 2.11 has (tests/test_bench.py checks the torch names used here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.constants import KEYFRAMES, MAX_REFERENCES, TEXT_TOKENS  # noqa: E402 (plain numbers: no torch needed)

RESULTS = ROOT / "bench" / "gpu_results"
DEADLINE_S = 470  # the whole run, so it ends within 8 minutes with start-up and writing
FRAMES, HEIGHT, WIDTH, REFS = KEYFRAMES, 480, 768, MAX_REFERENCES  # a full clip in the release's first bucket
VARIANT = "worldstereo-memory-dmd"
DEVICE, DTYPE = "cuda", "bfloat16"  # the model's device and dtype (tests/test_bench.py runs the sections on a CPU)
# (name, time limit in seconds, what it measures); run in this order while the deadline allows
SECTIONS = (
    ("env", 45, "machine, versions, bf16 matmul rate; point render on CUDA (1M points -> 21 x 480x768)"),
    ("tests", 100, "pytest -m gpu"),
    ("forward", 75, "14B bf16 transformer forward, 21x480x768, 0 and 8 references, eager"),
    ("clip-none", 100, "DMD clip end to end at full size, per stage, --offload none"),
    ("clip-group", 110, "the same clip with --offload group"),
    ("clip-model", 90, "the same clip with --offload model"),
    ("clip-text-encoder", 70, "the same clip with --offload text-encoder"),
    ("compile", 240, "the forward under torch.compile, 0 then 8 references: compile time and step time"),
)


# ------------------------------------------------------------------------------------------------ helpers
def _sync():
    import torch

    torch.cuda.synchronize()


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, all) of ``repeats`` calls after one warm-up call."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


def matmul_rate(n: int = 8192, repeats: int = 50) -> float:
    """Dense bf16 matmul FLOP/s measured here."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds, _ = _timed(lambda: [a @ b for _ in range(repeats)], 3)
    return 2 * n**3 * repeats / seconds


def _dtype():
    import torch

    return getattr(torch, DTYPE)


def full_transformer(seed: int = 0):
    """The 14B WorldStereo transformer (DMD memory variant), random weights, built on the GPU in bf16, with the
    float32 modules the loader keeps in float32."""
    from engine.models.loading import full_size_transformer_config, place_model
    from engine.models.transformer import WorldStereoTransformer

    cfg, base = full_size_transformer_config(VARIANT)
    with _building(_dtype(), seed):
        model = WorldStereoTransformer.from_checkpoint_config(cfg, base)
    return place_model(model, DEVICE, _dtype()).eval().requires_grad_(False), cfg, base



@contextmanager
def _building(dtype, seed: int):
    """Modules made inside are built directly on ``DEVICE`` in ``dtype`` (random init on the GPU), from ``seed``."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(seed)
    try:
        with torch.device(DEVICE):
            yield
    finally:
        torch.set_default_dtype(previous)


def full_components(offload: str):
    """UMT5-XXL (bf16), CLIP ViT-H/14 and the Wan2.1 VAE (float32, as the engine loads them), random weights, placed
    as ``offload`` says. The tokenizer is the tiny package's (token ids only; the text encoder's weights are random)."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from engine.models.components import assemble_components
    from engine.models.tiny import tiny_tokenizer
    from engine.offload import Placement

    with _building(_dtype(), 1):
        text = UMT5EncoderModel(UMT5Config(
            vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    with _building(torch.float32, 2):
        image = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                 num_attention_heads=16, image_size=224, patch_size=14,
                                                 projection_dim=1024, hidden_act="gelu"))
        vae = AutoencoderKLWan()  # diffusers' defaults are the Wan2.1 VAE's
    return assemble_components(vae, text, tiny_tokenizer(), image, CLIPImageProcessor(), Placement(offload, DEVICE),
                               _dtype())


def clip_conditions(seed: int):
    """One clip's official conditions at full size with 8 references (random content; the work is the same)."""
    import numpy as np
    import torch
    from PIL import Image

    from engine.conditioning import ClipConditions

    g = torch.Generator().manual_seed(seed)
    f, h, w, r = FRAMES, HEIGHT, WIDTH, REFS
    k = torch.tensor([[400.0, 0, w / 2], [0, 400.0, h / 2], [0, 0, 1]]).expand(f, 3, 3)
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return ClipConditions(
        image=Image.fromarray(np.ascontiguousarray(pixels)), extrinsics=torch.eye(4).expand(f, 4, 4),
        intrinsics=k, render_video=torch.rand(1, 3, f, h, w, generator=g) * 2 - 1,
        render_mask=(torch.rand(1, 1, f, h, w, generator=g) > 0.7).float(),
        camera_embedding=torch.randn(1, 6, f, h, w, generator=g), camera_qt=torch.randn(1, f, 7, generator=g),
        camera_qt_ref=torch.randn(1, r, 7, generator=g), ref_index=torch.arange(r) * 2 % (f - 1),
        reference_video=torch.rand(1, 3, r, h, w, generator=g) * 2 - 1)


# ------------------------------------------------------------------------------------------------ sections
def section_env(out: dict) -> None:
    import torch

    from engine.geometry.render import render_points
    from render import orbit_cameras

    props = torch.cuda.get_device_properties(0)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("diffusers", "transformers", "accelerate", "safetensors", "numpy"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = "missing"
    out.update(device=torch.cuda.get_device_name(0), memory_gib=_gib(props.total_memory), versions=versions,
               bf16_matmul_tflops=round(matmul_rate() / 1e12, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    pts = torch.rand(1_000_000, 3, device="cuda", generator=g) * 2 - 1
    cols = torch.rand(1_000_000, 3, device="cuda", generator=g)
    cams = orbit_cameras(FRAMES, WIDTH, HEIGHT).to(device="cuda")
    render = {}
    for radius in (0, 2):  # 2: the release's splat radius at 480 rows
        seconds, _ = _timed(lambda: render_points(pts, cols, cams, radius=radius, pointmaps=False), 10)
        render[f"radius_{radius}_ms"] = round(seconds * 1e3, 2)
    out["render_1M_points_21x480x768"] = render


def section_tests(out: dict) -> None:
    junit = Path(tempfile.mkdtemp()) / "gpu.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--junitxml={junit}", "tests"],
                          cwd=ROOT, capture_output=True, text=True)
    out["exit_status"] = done.returncode
    out["summary"] = (done.stdout.strip().splitlines() or [""])[-1]
    out["results"] = _junit_outcomes(junit) if junit.is_file() else {}
    if done.returncode not in (0, 1):
        out["output_tail"] = done.stdout[-3000:] + done.stderr[-2000:]


def _junit_outcomes(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if problem is None:
            outcomes[name] = "passed"
        elif problem.tag == "skipped":
            continue  # not a GPU test (deselected by the marker) or skipped on purpose
        else:
            message = (problem.get("message") or "").splitlines()
            outcomes[name] = f"{problem.tag}: {message[0][:300] if message else ''}"
    return outcomes


def section_forward(out: dict, backend: str = "eager") -> None:
    import torch

    from engine.runtime import make_backend
    from flops import worldstereo_flops
    from transformer import inputs

    rate = matmul_rate()
    model, cfg, base = full_transformer()
    net = make_backend(backend, model, fallback=False)
    out["parameters_billion"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    out["bf16_matmul_tflops"] = round(rate / 1e12, 1)
    for refs in (0, REFS):
        kw = inputs(base, FRAMES, HEIGHT, WIDTH, refs, DEVICE, _dtype(), TEXT_TOKENS)
        flops = worldstereo_flops(base, cfg.controlnet_cfg.to_dict(), FRAMES, HEIGHT, WIDTH, refs,
                                  text_tokens=TEXT_TOKENS)["total"]
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            t0 = time.perf_counter()
            net(**kw)  # the first call (compilation, for torch.compile)
            _sync()
            first = time.perf_counter() - t0
            seconds, _ = _timed(lambda: net(**kw), 2)
        out[f"refs_{refs}"] = {"first_call_s": round(first, 2), "step_s": round(seconds, 3),
                               "peak_gib": _gib(torch.cuda.max_memory_allocated()), "pflop": float(f"{flops / 1e15:.4g}"),
                               "tflops": round(flops / seconds / 1e12, 1),
                               "share_of_matmul_rate": round(flops / seconds / rate, 3)}
        _write_partial(out)  # a compile that runs out of time still leaves the first shape's figures


def section_clip(out: dict, offload: str) -> None:
    import torch

    from engine.pipeline import ClipPipeline

    t0 = time.perf_counter()
    transformer, cfg, _ = full_transformer()
    components = full_components(offload)
    pipe = ClipPipeline(transformer, components, cfg, dtype=_dtype())
    _sync()
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["resident_gib"] = _gib(torch.cuda.memory_allocated())
    runs = [("cold", 0)] if offload != "none" else [("cold", 0), ("warm", 1)]
    cold = None
    for label, seed in runs:  # the warm run has a new image and prompt: every encoder runs again
        torch.cuda.reset_peak_memory_stats()
        stages, latents = _staged_clip(pipe, clip_conditions(seed), f"a quiet street, take {seed}")
        out[label] = {"stages_s": stages, "total_s": round(sum(stages.values()), 2),
                      "peak_gib": _gib(torch.cuda.max_memory_allocated())}
        cold = latents.cpu() if cold is None else cold
        _write_partial(out)
    reference = Path(tempfile.gettempdir()) / "worldstereo-gpu-check-none.pt"
    if offload == "none":
        torch.save(cold, reference)
    elif reference.is_file():  # the same weights and inputs as the none clip: the same latents
        out["max_latent_difference_from_none"] = float((cold - torch.load(reference)).abs().max())


def _staged_clip(pipe, cond, prompt: str):
    """One DMD clip through the pipeline's named steps, each timed (``generate`` runs exactly these)."""
    import torch

    stages = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        value = fn()
        _sync()
        stages[name] = round(time.perf_counter() - t0, 3)
        return value

    with torch.no_grad():
        sampler = pipe.make_sampler()
        text = stage("encode_prompt", lambda: pipe.encode_prompt(prompt))
        image = stage("encode_image", lambda: pipe.encode_image(cond))
        inputs = stage("prepare_conditions", lambda: pipe.prepare_conditions(cond))
        noise = pipe.prepare_latents(cond.num_frames, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
        latents = stage("denoise_4_steps", lambda: pipe.denoise(
            noise, {"encoder_hidden_states": text, "encoder_hidden_states_image": image, **inputs}, sampler))
        stage("decode", lambda: pipe.decode(latents))
    return stages, latents


SECTION_RUNNERS = {
    "env": section_env,
    "tests": section_tests,
    "forward": section_forward,
    "clip-none": lambda out: section_clip(out, "none"),
    "clip-group": lambda out: section_clip(out, "group"),
    "clip-model": lambda out: section_clip(out, "model"),
    "clip-text-encoder": lambda out: section_clip(out, "text-encoder"),
    "compile": lambda out: section_forward(out, backend="compile"),
}


# ------------------------------------------------------------------------------------------------ driver
_PARTIAL: Path | None = None


def _write_partial(out: dict) -> None:
    if _PARTIAL is not None:
        _PARTIAL.write_text(json.dumps(out, indent=1))


def run_section(name: str, result_file: Path) -> None:
    """In the section's own process: run it and leave its figures in ``result_file``."""
    global _PARTIAL
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    _PARTIAL = result_file
    out: dict = {}
    try:
        SECTION_RUNNERS[name](out)
        out["status"] = "done"
    except Exception as e:  # recorded, and the next section still runs
        out["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
    _write_partial(out)


def run_in_own_process(name: str, timeout: float) -> dict:
    """Run one section in a fresh process (its own CUDA context), killed after ``timeout`` seconds."""
    result_file = Path(tempfile.mkstemp(suffix=".json")[1])
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--section", name, "--result", str(result_file)], cwd=ROOT,
                            start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    text = result_file.read_text()
    result_file.unlink()
    section = json.loads(text) if text.strip() else {}
    if proc.returncode != 0:
        section["status"] = f"stopped after {timeout:.0f} s (time limit)" if proc.returncode == -9 \
            else f"process ended with status {proc.returncode}"
    section.setdefault("status", "stopped")
    section["seconds"] = round(time.perf_counter() - t0, 1)
    return section


def cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not importable with this python"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU"
    return True, torch.cuda.get_device_name(0)


def print_plan(only: list[str]) -> None:
    print(f"bench/gpu_check: sections, in order, within {DEADLINE_S} s overall:")
    for name, limit, what in SECTIONS:
        if name in only:
            print(f"  {name:18s} up to {limit:3d} s  {what}")
    print(f"  results -> {os.path.relpath(RESULTS, ROOT)}/<date>-<device>.json and .md")


def markdown(results: dict) -> str:
    """The results as a page to read (and to copy into bench/RESULTS.md and README)."""
    env = results["sections"].get("env", {})
    lines = [f"# GPU check, {results['date']}", "", f"Device: {results['device']}; "
             f"versions: {json.dumps(env.get('versions', {}))}; command: `bash bench/gpu_check.sh`", ""]
    rate = env.get("bf16_matmul_tflops")
    lines += [f"Measured dense bf16 matmul rate: {rate} TFLOP/s.", ""]
    if "render_1M_points_21x480x768" in env:
        lines += [f"Point render (1M points -> 21 x 480x768, CUDA): {env['render_1M_points_21x480x768']}", ""]
    lines += ["| forward (14B, bf16, 21x480x768) | refs | step s | peak GiB | TFLOP/s | of matmul rate | first call s |",
              "|---|---|---|---|---|---|---|"]
    for backend in ("forward", "compile"):
        sec = results["sections"].get(backend, {})
        for refs in (0, REFS):
            r = sec.get(f"refs_{refs}")
            if r:
                lines.append(f"| {'eager' if backend == 'forward' else 'compile'} | {refs} | {r['step_s']} | "
                             f"{r['peak_gib']} | {r['tflops']} | {r['share_of_matmul_rate']:.0%} | {r['first_call_s']} |")
    lines += ["", "| --offload | peak GiB | DMD clip s (cold) | warm s | stages (cold) s | max latent diff vs none |",
              "|---|---|---|---|---|---|"]
    for mode in ("none", "text-encoder", "model", "group"):
        sec = results["sections"].get(f"clip-{mode}", {})
        if "cold" in sec:
            warm = sec.get("warm", {}).get("total_s", "")
            lines.append(f"| {mode} | {sec['cold']['peak_gib']} | {sec['cold']['total_s']} | {warm} | "
                         f"{sec['cold']['stages_s']} | {sec.get('max_latent_difference_from_none', '')} |")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    for name, sec in results["sections"].items():
        lines.append(f"| {name} | {sec.get('status', '')} | {sec.get('seconds', '')} |")
    tests = results["sections"].get("tests", {})
    if tests.get("results"):
        lines += ["", f"pytest -m gpu: {tests.get('summary', '')}", ""]
        lines += [f"- {name}: {outcome}" for name, outcome in sorted(tests["results"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma list of sections (default: all, in order)")
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        run_section(args.section, args.result)
        return 0
    names = [s[0] for s in SECTIONS]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(names)}.", file=sys.stderr)
        return 2
    print_plan(only)
    ok, device = cuda_available()
    if not ok:
        print(f"Nothing was measured: {device}. Run `bash bench/gpu_check.sh` on a machine with a CUDA GPU.")
        return 0
    start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    stem = f"{date.today().isoformat()}-{slug}"
    results = {"date": date.today().isoformat(), "device": device, "command": "bash bench/gpu_check.sh",
               "sections": {}}
    for name, limit, _ in SECTIONS:
        if name not in only:
            continue
        left = DEADLINE_S - (time.perf_counter() - start)
        if left < 20:
            section = {"status": "not run: the overall time budget was spent"}
        else:
            print(f"[{time.perf_counter() - start:5.0f} s] {name} (up to {min(limit, left):.0f} s)", flush=True)
            section = run_in_own_process(name, min(limit, left))
        results["sections"][name] = section
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / f"{stem}.md").write_text(markdown(results))
        print(f"         {section['status']}", flush=True)
    print(f"Wrote {os.path.relpath(RESULTS / stem, ROOT)}.json and .md in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
