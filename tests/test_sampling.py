"""Samplers against analytic answers: the DMD schedule formula, straight-line flows, a Gaussian flow map."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from engine.sampling import (
    DMDEulerSampler,
    SamplingCancelled,
    UniPCSampler,
    dmd_timesteps,
    guided_velocity,
    make_sampler,
    sample,
)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps,start", [(4, 250), (3, 100), (1, 250)])
def test_dmd_timesteps_match_formula(shift, steps, start):
    got = dmd_timesteps(steps=steps, start=start, end=1000, shift=shift)
    # independent scalar evaluation of the documented recipe
    if steps == 1:
        lin = [float(start)]
    else:
        lin = [start + (1000 - start) * k / (steps - 1) for k in range(steps)]
    expect = []
    for t in reversed(lin):
        u = t / 1000
        expect.append(1000 * shift * u / (1 + (shift - 1) * u))
    assert got.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-9)
    assert all(a > b for a, b in zip(got.tolist(), got.tolist()[1:]))  # strictly descending


def test_dmd_counts_training_timesteps_to_its_end_step():
    """The release's DMD scheduler takes dmd_end_steps as num_train_timesteps: the schedule is divided and multiplied
    by it, and a timestep's noise level is t / end (not t / 1000)."""
    start, end, shift, steps = 100.0, 800.0, 5.0, 4
    got = dmd_timesteps(steps, start, end, shift)
    lin = [start + (end - start) * k / (steps - 1) for k in range(steps)]
    expect = [end * shift * (t / end) / (1 + (shift - 1) * (t / end)) for t in reversed(lin)]
    assert got.tolist() == pytest.approx(expect, rel=1e-12)
    assert got[0].item() == pytest.approx(end)  # the first step starts from pure noise, sigma = 1
    s = DMDEulerSampler(steps, start, end, shift)
    out = s.step(torch.ones(1, dtype=torch.float64), 0, torch.zeros(1, dtype=torch.float64))
    assert out.item() == pytest.approx((expect[1] - expect[0]) / end)
    assert s.step(torch.ones(1, dtype=torch.float64), 3, torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(-expect[3] / end)


def test_dmd_default_schedule_values():
    # shift 1 leaves the linear schedule alone: 1000, 750, 500, 250
    assert dmd_timesteps().tolist() == pytest.approx([1000.0, 750.0, 500.0, 250.0])


def _constant_field(v):
    calls = []

    def fn(x, t):
        calls.append((x.shape[0], t.clone()))
        return v.expand_as(x).clone()

    return fn, calls


@pytest.mark.parametrize("sampler", [DMDEulerSampler(4, 250, 1000, 5.0), UniPCSampler(40, 3.0), UniPCSampler(7, 1.0)])
def test_constant_velocity_is_integrated_exactly(sampler):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    fn, calls = _constant_field(v)
    x0 = sample(fn, x_T, sampler)
    # a straight line from sigma=1 to sigma=0 moves by exactly -v (UniPC starts at 1-1e-6)
    assert torch.allclose(x0, x_T - v, atol=2e-6)
    assert len(calls) == len(sampler.timesteps)
    assert torch.equal(torch.stack([c[1][0] for c in calls]), sampler.timesteps.to(torch.stack([c[1][0] for c in calls]).dtype))


def test_dmd_first_euler_step_size():
    s = DMDEulerSampler(4, 250, 1000, 3.0)
    x = torch.zeros(1)
    v = torch.ones(1, dtype=torch.float64)
    t = dmd_timesteps(4, 250, 1000, 3.0)
    out = s.step(v, 0, x.double())
    assert out.item() == pytest.approx((t[1] - t[0]).item() / 1000)
    out = s.step(v, 3, x.double())
    assert out.item() == pytest.approx(-t[3].item() / 1000)  # last step lands on sigma = 0


def test_unipc_follows_gaussian_flow_map():
    # Data x0 ~ N(mu, s^2) in 1-D. The flow-matching velocity E[noise - x0 | x_sigma] is affine in x and the ODE
    # maps noise z (sigma=1) to mu + s*z (sigma=0): a closed-form answer for a curved, state-dependent field.
    mu, s = 0.7, 0.5
    sampler = UniPCSampler(40, 3.0)

    def velocity(x, t):
        # the model sees integer timesteps (as in Wan); evaluate the field at the solver's exact sigma
        i = int((sampler.timesteps == t[0]).nonzero()[0])
        sig = float(sampler.sigmas[i]) if sampler.uses_guidance else float(t[0]) / 1000
        var = (1 - sig) ** 2 * s**2 + sig**2
        dev = x - (1 - sig) * mu
        e_noise = sig / var * dev
        e_x0 = mu + (1 - sig) * s**2 / var * dev
        return e_noise - e_x0

    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1)
    out = sample(velocity, z, sampler)
    assert torch.allclose(out, mu + s * z, atol=5e-3), (out - mu - s * z).abs().max()
    # the coarse 4-step Euler student is not accurate on this field: the test can tell samplers apart
    sampler = DMDEulerSampler(4, 250, 1000, 3.0)
    coarse = sample(velocity, z, sampler)
    assert not torch.allclose(coarse, mu + s * z, atol=5e-2)


def test_cfg_is_one_batched_call_and_combines_linearly():
    g = torch.Generator().manual_seed(1)
    cond_v = torch.randn(1, 3, generator=g, dtype=torch.float64)
    uncond_v = torch.randn(1, 3, generator=g, dtype=torch.float64)
    seen = []

    def fn(x, t):
        seen.append(x.shape[0])
        half = x.shape[0] // 2
        return torch.cat([cond_v.expand(half, 3), uncond_v.expand(half, 3)])

    x_T = torch.randn(2, 3, generator=g, dtype=torch.float64)
    sampler = UniPCSampler(5, 3.0)
    out = sample(fn, x_T, sampler, guidance=5.0)
    assert seen == [4] * 5  # one forward per step on [cond; uncond]
    combined = uncond_v + 5.0 * (cond_v - uncond_v)
    assert torch.allclose(out, x_T - combined, atol=2e-6)
    assert torch.allclose(guided_velocity(cond_v, uncond_v, 2.5), uncond_v * (1 - 2.5) + 2.5 * cond_v)


def test_dmd_ignores_guidance():
    seen = []

    def fn(x, t):
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    sample(fn, torch.zeros(3, 2), make_sampler("dmd", shift=5.0), guidance=5.0)
    assert seen == [3] * 4


def test_progress_and_cancel():
    reports = []
    sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 2), make_sampler("unipc", steps=6),
           progress=lambda f, m: reports.append(f))
    assert reports == pytest.approx([(i + 1) / 6 for i in range(6)])

    ev = threading.Event()
    count = []

    def fn(x, t):
        count.append(1)
        if len(count) == 2:
            ev.set()
        return torch.zeros_like(x)

    with pytest.raises(SamplingCancelled):
        sample(fn, torch.zeros(1, 2), make_sampler("dmd"), cancel=ev)
    assert len(count) == 2


def test_unipc_is_reusable_after_reset():
    sampler = UniPCSampler(8, 3.0)
    fn = lambda x, t: torch.sin(x) + t.view(-1, 1) / 1000  # noqa: E731
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(sample(fn, x, sampler), sample(fn, x, sampler))
    assert math.isclose(float(sampler.sigmas[-1]), 0.0)
