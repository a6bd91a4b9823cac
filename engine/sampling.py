"""Samplers for the flow-matching ODE: 4-step DMD Euler and 40-step UniPC (with classifier-free guidance).

Flow-matching convention (Wan): ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` and the network predicts the
velocity ``v = noise - x_0``; the model's timestep is ``1000 * sigma`` (for DMD ``dmd_end_steps * sigma``, as the
release's DMD scheduler counts its training timesteps to ``dmd_end_steps``). A sampler exposes the timesteps it
wants the model evaluated at and advances ``x`` from one of them to the next given the velocity there.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from engine.progress import Progress, ensure

NUM_TRAIN_TIMESTEPS = 1000

# A velocity function: (x [N,...], timestep [N]) -> v [N,...]. With guidance, N is twice the batch: the
# caller's conditioning is laid out as [cond; uncond] to match.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SamplingCancelled(RuntimeError):
    """Raised between denoising steps when the caller asked to stop."""


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-shift reparameterisation ``s*t / (1 + (s-1)*t)`` (spends more steps at high noise for s > 1)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dmd_timesteps(steps: int = 4, start: float = 250, end: float = 1000, shift: float = 1.0) -> torch.Tensor:
    """The DMD student's timesteps (float64, descending, in model units), as the release's
    ``FlowGeneratorScheduler`` (release: models/dmd_scheduler.py) makes them: ``end`` (the config's
    ``dmd_end_steps``) is its ``num_train_timesteps``, so ``linspace(start, end, steps)`` reversed is divided by
    ``end``, shifted, and multiplied by ``end`` again; the noise level of a timestep is ``t / end``."""
    if steps < 1:
        raise ValueError(f"DMD needs at least one step; got {steps}.")
    t = torch.linspace(float(start), float(end), steps, dtype=torch.float64).flip(0) / float(end)
    return shift_sigmas(t, float(shift)) * float(end)


class Sampler(Protocol):
    """What :func:`sample` needs from a sampler.

    ``timesteps`` are the model timesteps (float, descending); ``step`` moves ``x`` from ``timesteps[t_index]``
    to the next one (to clean data after the last); ``reset`` forgets multistep history before a new run.
    """

    timesteps: torch.Tensor
    uses_guidance: bool

    def reset(self) -> None: ...

    def step(self, velocity: torch.Tensor, t_index: int, x: torch.Tensor) -> torch.Tensor: ...


class DMDEulerSampler:
    """Few-step distilled sampling: plain Euler steps of the flow ODE at the DMD timesteps, no guidance."""

    uses_guidance = False

    def __init__(self, steps: int = 4, start: float = 250, end: float = 1000, shift: float = 1.0):
        self.timesteps = dmd_timesteps(steps, start, end, shift).float()
        sig = dmd_timesteps(steps, start, end, shift) / float(end)
        self.sigmas = torch.cat([sig, sig.new_zeros(1)])  # float64: the step sizes are differences of these

    def reset(self) -> None:
        pass

    def step(self, velocity: torch.Tensor, t_index: int, x: torch.Tensor) -> torch.Tensor:
        d_sigma = float(self.sigmas[t_index + 1] - self.sigmas[t_index])
        return x + d_sigma * velocity.to(x.dtype)


class UniPCSampler:
    """UniPC multistep (diffusers) configured for flow matching, as the Wan2.1 pipelines use it.

    ``config``: a scheduler config (the base model's ``scheduler/scheduler_config.json``, which the release loads
    with ``UniPCMultistepScheduler.from_pretrained``); it wins over ``shift`` and ``solver_order``.
    """

    uses_guidance = True

    def __init__(self, steps: int = 40, shift: float = 3.0, solver_order: int = 2, config: Optional[dict] = None):
        from diffusers import UniPCMultistepScheduler

        self.num_steps = int(steps)
        if config is not None:
            self.scheduler = UniPCMultistepScheduler.from_config(config)
        else:
            self.scheduler = UniPCMultistepScheduler(
                num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=float(shift),
                solver_order=solver_order,
            )
        self.reset()

    def reset(self) -> None:
        self.scheduler.set_timesteps(self.num_steps)
        # diffusers rounds its timesteps to integers for the model; the model sees exactly those
        self.timesteps = self.scheduler.timesteps.float()
        self._next = 0

    @property
    def sigmas(self) -> torch.Tensor:
        return self.scheduler.sigmas

    def step(self, velocity: torch.Tensor, t_index: int, x: torch.Tensor) -> torch.Tensor:
        if t_index != self._next:
            raise RuntimeError("UniPC is multistep: call step for consecutive indices after reset().")
        self._next += 1
        out = self.scheduler.step(velocity.to(x.dtype), self.scheduler.timesteps[t_index], x, return_dict=False)[0]
        return out


def make_sampler(kind: str, steps: Optional[int] = None, shift: float = 3.0, dmd_start: float = 250,
                 dmd_end: float = 1000, scheduler_config: Optional[dict] = None) -> Sampler:
    """``kind`` is 'dmd' (default 4 steps) or 'unipc' (default 40 steps; ``scheduler_config`` as ``UniPCSampler``)."""
    if kind == "dmd":
        return DMDEulerSampler(steps or 4, dmd_start, dmd_end, shift)
    if kind == "unipc":
        return UniPCSampler(steps or 40, shift, config=scheduler_config)
    raise ValueError(f"Unknown sampler '{kind}'; use 'dmd' or 'unipc'.")


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    return v_uncond + guidance * (v_cond - v_uncond)


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def sample(denoise_fn: DenoiseFn, x_T: torch.Tensor, sampler: Sampler, guidance: Optional[float] = None,
           progress: Optional[Progress] = None, cancel=None) -> torch.Tensor:
    """Integrate from noise ``x_T`` to data with ``sampler``.

    With ``guidance`` (and a sampler that uses it) every step runs ONE model call on the batch
    ``[x; x]`` whose first half must be conditioned and second half unconditioned; the velocities combine
    as ``uncond + g * (cond - uncond)``. ``progress`` gets one report per step; ``cancel`` (a callable or an
    event) is checked before each step and raises :class:`SamplingCancelled`.
    """
    report = ensure(progress)
    use_cfg = guidance is not None and sampler.uses_guidance and float(guidance) != 1.0
    sampler.reset()
    x = x_T
    n = len(sampler.timesteps)
    batch = x.shape[0]
    for i, t in enumerate(sampler.timesteps):
        if _cancelled(cancel):
            raise SamplingCancelled(f"Sampling was cancelled before step {i + 1} of {n}.")
        if use_cfg:
            x_in = torch.cat([x, x])
            v = denoise_fn(x_in, t.to(x.device).expand(2 * batch))
            v = guided_velocity(v[:batch].to(x.dtype), v[batch:].to(x.dtype), float(guidance))
        else:
            v = denoise_fn(x, t.to(x.device).expand(batch)).to(x.dtype)
        x = sampler.step(v, i, x)
        report((i + 1) / n, f"denoising step {i + 1}/{n}")
    return x
