"""Test-only start-up code for the multi-process tests (tests/test_parallel.py puts this folder on PYTHONPATH of the
processes it launches, so Python imports it before anything else; the engine never does).

diffusers' context parallelism builds its device mesh for "the" accelerator and divides the rank by the accelerator
count; a CPU-only machine has neither. These two shims make it take the CPU (gloo) instead — the engine itself runs
sequence parallelism on CUDA GPUs only and says so on a machine without one.

``WORLDSTEREO_TEST_FAULT_RANK=k`` also makes rank k's attention kernel fail (an injected fault in the middle of a
sequence-parallel forward, as an out-of-memory error on one GPU would be).
"""
import os

import torch

torch.accelerator.device_count = lambda: 1
torch._C._get_accelerator = lambda: torch.device("cpu")

if os.environ.get("WORLDSTEREO_TEST_FAULT_RANK") not in (None, "") and \
        os.environ.get("WORLDSTEREO_TEST_FAULT_RANK") == os.environ.get("RANK"):
    def _failing_attention(*args, **kwargs):
        raise RuntimeError("injected fault in the attention kernel")

    torch.nn.functional.scaled_dot_product_attention = _failing_attention
