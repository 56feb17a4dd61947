"""Tests for pipelines.schedulers: every Runware scheduler name must sample a rectified-flow model correctly.

The "model" is the exact flow velocity of a known data distribution, fed exactly what Kandinsky's
transformer is fed: the scheduler's timestep t, read as sigma = t / 1000.

* Point mass at D: v = (x - D) / sigma. Every consistent sampler must land on D, whatever its order.
* Independent Gaussians x0 ~ N(m, s^2) per element: v = E[noise - x0 | x_sigma] in closed form. Its
  probability-flow ODE is affine, x_sigma = (1 - sigma) m + sqrt((1 - sigma)^2 s^2 + sigma^2) z, so a
  deterministic sampler started from noise z must reach m + s z; its error measures the solver's
  order. A stochastic sampler must produce (x - m) / s ~ N(0, 1); first-order SDE samplers lose some
  variance at few steps, so their bounds are per scheduler.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from k5serve.pipelines.schedulers import (
    DEFAULT_SCHEDULER,
    SCHEDULER_NAMES,
    is_stochastic,
    make_scheduler,
    resolve_scheduler_name,
    scheduler_step,
)

# diffusers' own DPM-Solver/UniPC set_timesteps trip a numpy-2 DeprecationWarning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 1, 16, 16, 16)  # (B, frames, h, w, channels): Kandinsky's channels-last latents
STEP_COUNTS = (10, 20, 50)
STOCHASTIC = {"DPM++ SDE Karras", "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Karras", "Euler a", "LCM", "DDPM"}
DETERMINISTIC = [n for n in SCHEDULER_NAMES if n not in STOCHASTIC]

_data = torch.Generator().manual_seed(1234)
POINT = torch.randn(SHAPE, generator=_data) * 0.8 + 0.2
MEAN = torch.randn(SHAPE, generator=_data) * 0.5
STD = torch.rand(SHAPE, generator=_data) * 0.8 + 0.2


def point_mass_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - POINT.double()) / sigma


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor, items: slice = slice(None)) -> torch.Tensor:
    m, s2 = MEAN[items].double(), STD[items].double() ** 2
    var = (1 - sigma) ** 2 * s2 + sigma**2
    r = x - (1 - sigma) * m
    return sigma * r / var - (m + (1 - sigma) * s2 * r / var)  # E[noise | x] - E[x0 | x]


def generators(seed: int, batch: int = SHAPE[0]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def sample(scheduler, steps, velocity, noise, gens):
    """The generation loop of pipelines/k5.py with `velocity` as the transformer."""
    scheduler.set_timesteps(steps, device=torch.device("cpu"))
    x = noise.clone()
    for t in scheduler.timesteps:
        v = velocity(x.double(), t.double() / 1000).float()
        x = scheduler_step(scheduler, v, t, x, gens)
    return x


def run(name, steps, velocity=gaussian_velocity, noise_seed=0, step_seed=100, batch=SHAPE[0]):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(noise_seed))[:batch]
    return sample(make_scheduler(name), steps, velocity, noise, generators(step_seed, batch)), noise


def rel_err(x: torch.Tensor, target: torch.Tensor) -> float:
    return ((x - target).abs().mean() / target.abs().mean()).item()


# ---- 1. convergence -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_point_mass_lands_on_data(name, steps):
    x, _ = run(name, steps, point_mass_velocity)
    assert torch.isfinite(x).all()
    # Exact for every consistent sampler; measured <= 2e-8 (float32 rounding of t vs sigma).
    assert rel_err(x, POINT) < 1e-5


@pytest.mark.parametrize("steps", (1, 2, 3))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_very_few_steps_still_end_on_data(name, steps):
    x, _ = run(name, steps, point_mass_velocity)
    assert torch.isfinite(x).all()
    assert rel_err(x, POINT) < 1e-5


# Relative error to the exact ODE endpoint m + s z at 10 / 20 / 50 steps (measured values x ~1.3).
ODE_BOUNDS = {
    "DPM++ 2M Karras": (0.085, 0.025, 0.005),  # measured 0.065 / 0.018 / 0.003
    "Euler": (0.24, 0.12, 0.05),  # 0.184 / 0.092 / 0.037 (first order)
    "Euler Trailing": (0.22, 0.12, 0.05),  # 0.170 / 0.089 / 0.037
    "DDIM": (0.24, 0.12, 0.05),  # identical to Euler
    "PNDM": (0.12, 0.025, 0.007),  # 0.091 / 0.019 / 0.005
    "UniPC": (0.12, 0.025, 0.005),  # 0.093 / 0.017 / 0.003
}
assert set(ODE_BOUNDS) == set(DETERMINISTIC)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_solve_the_flow_ode(name):
    for steps, bound in zip(STEP_COUNTS, ODE_BOUNDS[name]):
        x, z = run(name, steps)
        assert torch.isfinite(x).all()
        err = rel_err(x, MEAN + STD * z)
        assert err < bound, f"{name} @ {steps} steps: ODE endpoint error {err:.4f} >= {bound}"


# Allowed std of (x - m) / s at 20 / 50 steps: SDE samplers lose variance when steps are coarse.
SDE_STD_RANGE = {
    "DPM++ SDE Karras": ((0.74, 1.05), (0.86, 1.05)),  # measured 0.79 / 0.90
    "DPM++ 2M SDE Exponential": ((0.94, 1.05), (0.96, 1.05)),  # 0.98 / 1.01
    "DPM++ 2M SDE Karras": ((0.95, 1.05), (0.96, 1.05)),  # 1.00 / 1.01
    "Euler a": ((0.74, 1.05), (0.83, 1.05)),  # 0.79 / 0.88
    "LCM": ((0.57, 0.70), (0.60, 0.72)),  # 0.62 / 0.66: re-noising x0 estimates needs a distilled model
    "DDPM": ((0.75, 1.05), (0.83, 1.05)),  # 0.80 / 0.88
}
assert set(SDE_STD_RANGE) == STOCHASTIC


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_reach_the_data_distribution(name):
    for steps, (lo, hi) in zip((20, 50), SDE_STD_RANGE[name]):
        x, _ = run(name, steps)
        assert torch.isfinite(x).all()
        z = (x - MEAN) / STD
        assert abs(z.mean().item()) < 0.05, f"{name} @ {steps}: mean {z.mean():.3f}"
        assert lo < z.std().item() < hi, f"{name} @ {steps}: std {z.std():.3f} not in ({lo}, {hi})"


# ---- 2. grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", (1, 2, 10, 20, 50))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_timesteps_are_1000_sigma_and_sigmas_end_at_zero(name, steps):
    scheduler = make_scheduler(name)
    scheduler.set_timesteps(steps, device=torch.device("cpu"))
    t = scheduler.timesteps
    sigmas = scheduler.sigmas
    assert len(t) == steps
    assert t.is_floating_point()
    assert (t[1:] < t[:-1]).all(), "timesteps must strictly decrease"
    assert 999.0 < t[0].item() <= 1000.0
    assert t[-1].item() > 0.0
    assert len(sigmas) == steps + 1
    assert sigmas[-1].item() == 0.0
    torch.testing.assert_close(t.double(), 1000 * sigmas[:-1].double(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_shift_is_applied(name):
    grids = []
    for shift in (1.0, 3.0):
        scheduler = make_scheduler(name, shift=shift)
        scheduler.set_timesteps(20)
        grids.append(scheduler.timesteps)
    assert not torch.allclose(grids[0], grids[1])
    assert (grids[1][1:] >= grids[0][1:]).all()  # shift > 1 spends more steps at high noise


def test_default_is_flowmatch_euler_shift_3():
    scheduler = make_scheduler(None)
    assert DEFAULT_SCHEDULER == "Euler"
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    assert scheduler.config.shift == 3.0
    assert not is_stochastic(None)


def test_euler_trailing_is_the_official_kandinsky_grid():
    scheduler = make_scheduler("Euler Trailing")
    scheduler.set_timesteps(4)
    grid = torch.linspace(1, 0, 5, dtype=torch.float64)[:-1]
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), 3 * grid / (1 + 2 * grid), rtol=0, atol=1e-7)


def test_ddim_equals_euler():
    ddim, _ = run("DDIM", 20)
    euler, _ = run("Euler", 20)
    assert torch.equal(ddim, euler)


# ---- 3. fresh state per request -----------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_fresh_instance_per_call_and_no_shared_state(name):
    a, b = make_scheduler(name), make_scheduler(name)
    assert a is not b
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    alone = sample(make_scheduler(name), 12, gaussian_velocity, noise, generators(7))

    for s in (a, b):
        s.set_timesteps(12)
    xa, xb = noise.clone(), noise.clone()
    ga, gb = generators(7), generators(7)
    for ta, tb in zip(a.timesteps, b.timesteps):  # interleaved, step by step
        xa = scheduler_step(a, gaussian_velocity(xa.double(), ta.double() / 1000).float(), ta, xa, ga)
        xb = scheduler_step(b, gaussian_velocity(xb.double(), tb.double() / 1000).float(), tb, xb, gb)
    assert torch.equal(xa, alone)
    assert torch.equal(xb, alone)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_set_timesteps_resets_a_used_scheduler(name):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    scheduler = make_scheduler(name)
    first = sample(scheduler, 10, gaussian_velocity, noise, generators(5))
    again = sample(scheduler, 10, gaussian_velocity, noise, generators(5))
    assert torch.equal(first, again)


# ---- 4. generators ------------------------------------------------------------------------------


def test_is_stochastic_table():
    assert {n for n in SCHEDULER_NAMES if is_stochastic(n)} == STOCHASTIC


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_seed_controls_stochastic_samplers_only(name):
    same_1, _ = run(name, 10, step_seed=11)
    same_2, _ = run(name, 10, step_seed=11)
    other, _ = run(name, 10, step_seed=12)
    assert torch.equal(same_1, same_2)
    if is_stochastic(name):
        assert rel_err(other, same_1) > 1e-2
    else:
        assert torch.equal(other, same_1)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        no_generator = sample(make_scheduler(name), 10, gaussian_velocity, noise, None)
        assert torch.equal(no_generator, same_1)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_single_generator_is_reproducible(name):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    runs = [
        sample(make_scheduler(name), 8, gaussian_velocity, noise, torch.Generator().manual_seed(21))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_batch_with_generator_list_equals_items_alone(name):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    batch = sample(make_scheduler(name), 10, gaussian_velocity, noise, generators(40))
    for i in range(SHAPE[0]):
        item = slice(i, i + 1)
        alone = sample(
            make_scheduler(name),
            10,
            lambda x, sigma: gaussian_velocity(x, sigma, item),
            noise[item],
            [torch.Generator().manual_seed(40 + i)],
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-6)


# ---- 5. names -----------------------------------------------------------------------------------


def test_names_match_the_api_contract():
    from k5serve.server.protocol.models import SCHEDULER_NAMES as CONTRACT

    assert SCHEDULER_NAMES == CONTRACT


@pytest.mark.parametrize("bad", ["euler", "Euler A", "DPM++ 2M", "", "k_euler"])
def test_unknown_name_raises_with_the_allowed_names(bad):
    for call in (make_scheduler, is_stochastic):
        with pytest.raises(ValueError) as info:
            call(bad)
        message = str(info.value)
        assert repr(bad) in message
        for name in SCHEDULER_NAMES:
            assert name in message


def test_case_insensitive_lookup_helper():
    assert resolve_scheduler_name("Euler a") == "Euler a"
    assert resolve_scheduler_name("euler A") == "Euler a"
    assert resolve_scheduler_name("  dpm++ 2m  sde karras ") == "DPM++ 2M SDE Karras"
    assert resolve_scheduler_name("UNIPC") == "UniPC"
    with pytest.raises(ValueError, match="Allowed"):
        resolve_scheduler_name("Heun")
