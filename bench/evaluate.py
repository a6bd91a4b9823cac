"""Benchmark: seconds to judge one clip's camera accuracy (engine.evaluate.evaluate_clip) at the real clip size.

    python bench/evaluate.py [--width 768 --height 480 --frames 21 --threads 2 --repeats 1]

Workload: a textured room (``textured_room``: the six walls of a 4 x 3 x 6 box as a point cloud, random colour
cells at three scales so SIFT finds corners everywhere) rendered with the project's point renderer along the
``left`` preset (an orbit of 20 degrees about a point 3 units ahead), then recovered with pycolmap (features,
exhaustive matching, global mapping) and judged against the cameras it was rendered from. The table gives the
seconds of each stage, the frames registered and the figures, so a run that failed to register is visible.
tests/test_evaluate.py builds its ground truth with the same room.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.geometry import trajectories as traj  # noqa: E402
from engine.geometry.cache import PointCache  # noqa: E402
from engine.geometry.cameras import Cameras, intrinsics_from_fov  # noqa: E402
from render import cpu_model  # noqa: E402  (bench/render.py, beside this script)

ROOM_LO, ROOM_HI = np.array([-2.0, -1.5, -2.0]), np.array([2.0, 1.5, 4.0])
CELL_SCALES = ((0.6, 0.5), (0.25, 0.3), (0.1, 0.2))  # (cell size, weight): colour cells at three scales


def textured_room(spacing: float = 0.01, seed: int = 0) -> PointCache:
    """The six walls of the room box as points on a grid of ``spacing``, each coloured by the weighted sum of random
    colour cells at ``CELL_SCALES`` (a seeded generator): texture at every scale a camera in the room sees."""
    rng = np.random.default_rng(seed)
    points, colours = [], []
    for axis in range(3):
        a, b = [k for k in range(3) if k != axis]
        ua, ub = np.meshgrid(np.arange(ROOM_LO[a], ROOM_HI[a], spacing), np.arange(ROOM_LO[b], ROOM_HI[b], spacing),
                             indexing="ij")
        for side in (ROOM_LO[axis], ROOM_HI[axis]):
            p = np.empty(ua.shape + (3,))
            p[..., axis], p[..., a], p[..., b] = side, ua, ub
            colour = np.zeros(ua.shape + (3,))
            for size, weight in CELL_SCALES:
                ia = ((ua - ROOM_LO[a]) / size).astype(int)
                ib = ((ub - ROOM_LO[b]) / size).astype(int)
                colour += weight * rng.random((ia.max() + 1, ib.max() + 1, 3))[ia, ib]
            points.append(p.reshape(-1, 3))
            colours.append(colour.reshape(-1, 3))
    pts = torch.from_numpy(np.concatenate(points)).float()
    return PointCache(pts, torch.from_numpy(np.concatenate(colours)).float(), torch.ones(len(pts)),
                      torch.full((len(pts),), -1))


def room_cameras(width: int, height: int, frames: int, amount: float = 20.0) -> Cameras:
    """The ``left`` preset from the room's centre-back, looking down +z, about a pivot 3 units ahead."""
    start = Cameras(torch.eye(4, dtype=torch.float64), intrinsics_from_fov(width, height, 70.0), width, height)
    return traj.make_trajectory("left", start, 3.0, frames=frames, amount=amount)


def main(argv=None) -> None:
    import open3d  # noqa: F401  (imported before the clock starts: once per process, not per clip)
    import pycolmap  # noqa: F401

    from engine.evaluate import VERSIONED_PACKAGES, judge_poses, recover_poses
    from engine.jobfolder import package_versions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2, help="threads for pycolmap and torch (default 2)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--spacing", type=float, default=0.01, help="grid spacing of the room's points")
    ap.add_argument("--radius", type=int, default=2, help="splat radius of the render (pixels)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cams = room_cameras(args.width, args.height, args.frames)
    cache = textured_room(args.spacing)
    frames = cache.render(cams, radius=args.radius).image
    rows = []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        recovered = recover_poses(frames, cams, threads=args.threads)
        result = judge_poses(cams, recovered)
        rows.append((time.perf_counter() - t0, time.process_time() - c0, result))
    total = [r[0] for r in rows]
    cpu = statistics.median(r[1] for r in rows)
    last = rows[-1][2]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    v = package_versions(VERSIONED_PACKAGES)
    print(f"machine : {cpu_model()}, {cores} cores, {args.threads} threads, pycolmap {v.get('pycolmap')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"workload: {args.frames} frames at {args.height}x{args.width}, room of {len(cache)} points, "
          f"radius {args.radius}")
    print()
    # CPU seconds (all threads) say what the clip costs when other work shares the cores and stretches the wall time.
    print("| total s (median) | min s | CPU s (median) | features s | matching s | mapping s | registered | mapper "
          "| RotErr deg | TransErr | ATE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    s = last.seconds
    figures = " | ".join("-" if v is None else f"{v:.4f}" for v in (last.rot_err_deg, last.trans_err, last.ate))
    print(f"| {statistics.median(total):.2f} | {min(total):.2f} | {cpu:.2f} | {s['features']:.2f} | {s['matching']:.2f} | "
          f"{s['mapping']:.2f} | {last.registered_count}/{last.frames} | {last.mapper} | {figures} |")


if __name__ == "__main__":
    main()
