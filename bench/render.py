"""Benchmark: point-cloud z-buffer rendering (engine.geometry.render.render_points) against two baselines.

    python bench/render.py [--points 1000000 --frames 21 --height 480 --width 768 --device cpu|cuda --repeats 3]

Scene: a uniform random cloud filling a 2x2x2 box, seen by cameras on a 60-degree arc at distance 3 looking
at its centre (a typical orbit trajectory), 60-degree horizontal field of view.
Baselines, written here on purpose in their plainest form:
- numpy: project in float32 per frame, ``np.lexsort`` by (pixel, depth, index), first entry of each pixel wins.
- torch: per frame ``scatter_reduce(amin)`` of the float depth, then a second ``amin`` over the indices of
  the points whose depth equals their pixel's minimum (the usual two-pass winner selection).
All three produce the same outputs (image, mask, depth, pointmap, index); the table reports how many pixels
the baselines' winners agree with render_points.
Targets: under 1 s on 2 CPU cores, under 20 ms on one H100/H200, at the default sizes (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.geometry.cameras import Cameras, intrinsics_from_fov  # noqa: E402
from engine.geometry.render import render_points  # noqa: E402

TARGET_S = {"cpu": 1.0, "cuda": 0.020}


def orbit_cameras(frames: int, width: int, height: int, radius: float = 3.0, arc_deg: float = 60.0) -> Cameras:
    w2c = torch.zeros(frames, 4, 4, dtype=torch.float64)
    for i in range(frames):
        a = math.radians(arc_deg) * (i / max(frames - 1, 1) - 0.5)
        center = torch.tensor([radius * math.sin(a), -0.3, -radius * math.cos(a)], dtype=torch.float64)
        forward = -center / center.norm()
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), forward)
        right /= right.norm()
        rot = torch.stack([right, torch.linalg.cross(forward, right), forward])
        w2c[i, :3, :3] = rot
        w2c[i, :3, 3] = -rot @ center
        w2c[i, 3, 3] = 1
    return Cameras(w2c, intrinsics_from_fov(width, height, 60.0, frames), width, height)


def numpy_zbuffer(points: np.ndarray, colors: np.ndarray, cams: Cameras, near: float = 1e-3):
    n, h, w = len(cams), cams.height, cams.width
    p = points.shape[0]
    ids = np.arange(p)
    out_index = np.full((n, h * w), -1, dtype=np.int64)
    out_depth = np.zeros((n, h * w), dtype=np.float32)
    for f in range(n):
        r = cams.w2c[f, :3, :3].numpy().astype(np.float32)
        t = cams.w2c[f, :3, 3].numpy().astype(np.float32)
        k = cams.K[f].numpy()
        cam = points @ r.T + t
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.float32(k[0, 0]) * cam[:, 0] / z + np.float32(k[0, 2])
            v = np.float32(k[1, 1]) * cam[:, 1] / z + np.float32(k[1, 2])
        keep = (z >= near) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        pix = np.floor(v[keep]).astype(np.int64) * w + np.floor(u[keep]).astype(np.int64)
        zk, ik = z[keep], ids[keep]
        order = np.lexsort((ik, zk, pix))
        ps = pix[order]
        first = np.ones(ps.shape[0], dtype=bool)
        first[1:] = ps[1:] != ps[:-1]
        out_index[f, ps[first]] = ik[order][first]
        out_depth[f, ps[first]] = zk[order][first]
    mask = out_index >= 0
    safe = np.where(mask, out_index, 0)
    image = np.where(mask[..., None], colors[safe], 0).reshape(n, h, w, 3).transpose(0, 3, 1, 2)
    pointmap = np.where(mask[..., None], points[safe], 0).reshape(n, h, w, 3)
    return out_index.reshape(n, h, w), image, out_depth.reshape(n, h, w), pointmap


def torch_scatter_zbuffer(points: torch.Tensor, colors: torch.Tensor, cams: Cameras, near: float = 1e-3):
    n, h, w = len(cams), cams.height, cams.width
    p = points.shape[0]
    dev = points.device
    ids = torch.arange(p, device=dev)
    index = torch.full((n, h * w), -1, dtype=torch.int64, device=dev)
    depth = torch.zeros(n, h * w, device=dev)
    cams = cams.to(device=dev, dtype=torch.float32)
    uv, z = cams.project(points)
    for f in range(n):
        u, v, zf = uv[f, :, 0], uv[f, :, 1], z[f]
        keep = (zf >= near) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        pix = (v[keep].floor().long() * w + u[keep].floor().long())
        zk, ik = zf[keep], ids[keep]
        zbuf = torch.full((h * w,), float("inf"), device=dev).scatter_reduce_(0, pix, zk, "amin")
        best = zk == zbuf[pix]
        ibuf = torch.full((h * w,), p, device=dev).scatter_reduce_(0, pix[best], ik[best], "amin")
        hit = ibuf < p
        index[f, hit] = ibuf[hit]
        depth[f, hit] = zbuf[hit]
    mask = index >= 0
    safe = index.clamp(min=0)
    image = torch.where(mask[..., None], colors[safe], 0).view(n, h, w, 3).permute(0, 3, 1, 2)
    pointmap = torch.where(mask[..., None], points[safe], 0).view(n, h, w, 3)
    return index.view(n, h, w), image, depth.view(n, h, w), pointmap


def timed(fn, repeats: int, sync) -> tuple[list[float], object]:
    out = None
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--radius", type=int, default=0)
    ap.add_argument("--skip-numpy", action="store_true", help="leave out the (slow) NumPy baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device.")
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    g = torch.Generator().manual_seed(args.seed)
    points = torch.rand(args.points, 3, generator=g) * 2 - 1
    colors = torch.rand(args.points, 3, generator=g)
    cams = orbit_cameras(args.frames, args.width, args.height)
    pts_d, cols_d = points.to(dev), colors.to(dev)

    # Warm-up (allocator, lazy init, CUDA context) on a slice; not timed.
    render_points(pts_d[:1000], cols_d[:1000], cams[:2].to(dev), radius=args.radius)
    rows = []
    t_ours, ours = timed(lambda: render_points(pts_d, cols_d, cams, radius=args.radius), args.repeats, sync)
    rows.append(("render_points (packed-key amin)", t_ours, None))
    if args.radius == 0:
        t_torch, plain = timed(lambda: torch_scatter_zbuffer(pts_d, cols_d, cams), args.repeats, sync)
        rows.append(("plain torch scatter_reduce(amin) x2", t_torch, plain[0]))
        if not args.skip_numpy:
            t_np, base = timed(lambda: numpy_zbuffer(points.numpy(), colors.numpy(), cams), args.repeats, lambda: None)
            rows.append(("numpy lexsort z-buffer (CPU)", t_np, torch.from_numpy(base[0])))

    ref_median = statistics.median(rows[-1][1]) if len(rows) == 3 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine : {cpu_model()}, {cores} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {dev_name}, load average {load}")
    print(f"sizes   : {args.points} points -> {args.frames} frames at {args.height}x{args.width}, radius {args.radius}, "
          f"{args.repeats} repeats; covered pixels {ours.mask.float().mean().item():.1%}")
    print()
    print(f"| {'method':38s} | median s | min s   | speed-up vs numpy | winners agree |")
    print(f"|{'-' * 40}|----------|---------|-------------------|---------------|")
    ours_index = ours.index.cpu()
    for name, times, index in rows:
        med = statistics.median(times)
        ratio = f"{ref_median / med:.2f}x" if ref_median else "n/a"
        agree = "(reference)" if index is None else f"{(index.cpu() == ours_index).double().mean().item():.4%}"
        print(f"| {name:38s} | {med:8.3f} | {min(times):7.3f} | {ratio:>17s} | {agree:>13s} |")
    target = TARGET_S[dev.type]
    med = statistics.median(t_ours)
    print()
    print(f"target  : render_points under {target * 1000:.0f} ms on {dev.type}: "
          f"{'MET' if med < target else 'NOT MET'} (median {med * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
