"""Launched by tests/test_parallel.py under ``torchrun --nproc-per-node 2`` on CPU (gloo): the tiny transformer's
output under 2-way Ulysses sequence parallelism against the same model's one-process output, for the camera variant
and the memory variants (references serving different target frames, carried or fed-again references, a CFG batch of
two); then a clip whose token count 2 does not divide, which every rank must refuse alike before any collective
(a later forward still matches). Rank 0 writes ``{case: max abs difference, "refused": message, "threads_left":
threads beyond those before the group, after it ended}`` as JSON to argv[1].
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from engine.models.loading import build_transformer, tiny_transformer_config
from engine.models.parallel import enable_sequence_parallel
from engine.models.transformer import InputError
from tiny_model import forward_inputs as inputs, wake_zero_layers

# name, variant, batch, latent frames, latent height, width, reference target frames (ref_index), update_ref
CASES = [
    ("camera", "worldstereo-camera", 1, 3, 8, 8, None, False),
    ("memory", "worldstereo-memory", 1, 4, 8, 8, [2, 0, 1], False),
    ("memory-update-ref", "worldstereo-memory", 1, 4, 8, 8, [1, 0], True),
    ("memory-cfg-batch", "worldstereo-memory", 2, 3, 8, 8, [0, 1], False),
]


def model_for(variant: str, update_ref: bool):
    cfg, base = tiny_transformer_config(variant)
    cfg.controlnet_cfg.update_ref = update_ref
    # the zero-initialised layers (branch outputs, camera codes) get weights, so they act
    return wake_zero_layers(build_transformer(cfg, base, seed=0), seed=1, scale=0.2)


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    threads = len(os.listdir("/proc/self/task"))
    dist.init_process_group("cpu:gloo")
    rank = dist.get_rank()
    models, args, single = {}, {}, {}
    with torch.no_grad():
        for name, variant, batch, frames, h, w, ref_index, update_ref in CASES:
            models[name] = model_for(variant, update_ref)
            args[name] = inputs(batch, frames, h, w, ref_index)
            single[name] = models[name](**args[name])
        for name in models:
            enable_sequence_parallel(models[name])
        diffs = {name: float((models[name](**args[name]) - single[name]).abs().max()) for name in models}
        try:
            models["memory"](**inputs(1, 3, 6, 10, [1]))  # 3 x 3 x 5 = 45 target tokens, 15 reference tokens
            diffs["refused"] = None
        except InputError as e:
            diffs["refused"] = str(e)
        diffs["after-refusal"] = float((models["memory"](**args["memory"]) - single["memory"]).abs().max())
    dist.destroy_process_group()
    # The models' device meshes keep the process groups, and with them gloo's threads, alive: let go of them now,
    # while the interpreter is whole (as engine.distributed.stop_group does), not at interpreter shutdown.
    models.clear()
    gc.collect()
    diffs["threads_left"] = len(os.listdir("/proc/self/task")) - threads
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(diffs, fh)


if __name__ == "__main__":
    atexit.register(gc.freeze)  # a quicker exit, as `python -m engine` (engine/__main__.py)
    main(sys.argv[1])
