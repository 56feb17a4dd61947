"""Runware scheduler names -> flow-matching samplers that converge for Kandinsky 5.0 Image Lite.

Kandinsky 5 is a rectified-flow model: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, the transformer
predicts the velocity ``v = noise - x0`` and is fed ``t = 1000 * sigma``; the official sampler uses a
shift of 3.0 (``sigma' = 3 sigma / (1 + 2 sigma)``). Sampling starts from unit Gaussian noise at
sigma = 1 and must end exactly at sigma = 0. A scheduler is usable here only if it

* builds its whole grid from ``set_timesteps(num_inference_steps, device=...)`` (the generation loop
  passes nothing else, so no ``sigmas=``/``mu=``);
* reports ``.timesteps == 1000 * sigma`` for the sigmas it really steps through (the transformer
  embeds t directly), and ends its ``.sigmas`` with 0 (otherwise noise is left in the image);
* treats ``model_output`` as a flow velocity. diffusers' VP schedulers of the same names
  (``DDIMScheduler``, ``DDPMScheduler``, ``PNDMScheduler``, ``EulerDiscreteScheduler``,
  ``EulerAncestralDiscreteScheduler``, ``LCMScheduler``, ``DPMSolverSDEScheduler``) read it as epsilon
  on a VP/VE noise schedule: fed the exact velocity of a point mass D, 20 steps end with
  mean|x - D| / mean|D| between 0.76 (DDIM) and 1e13 (Euler ancestral), so none is used.

The Runware names are therefore realised as follows (``FLOW`` = ``use_flow_sigmas=True,
prediction_type="flow_prediction", flow_shift=shift``; grids are described below):

====================  =============================================================  ===========  =====
Runware name          realisation                                                    grid         noise
====================  =============================================================  ===========  =====
(none) / Euler        ``FlowMatchEulerDiscreteScheduler(shift)``, the pipeline default euler        -
DDIM                  same as Euler: DDIM with eta=0 is *algebraically identical* to  euler        -
                      the Euler step for rectified flow (x0 and noise estimates are
                      extrapolated linearly in sigma either way)
Euler Trailing        ``FlowEulerScheduler`` (FlowMatch Euler on the official grid)  trailing     -
Euler a               ``FlowEulerAncestralScheduler`` = diffusers' RF Euler-ancestral euler        yes
                      (ComfyUI ``euler_ancestral_RF``, eta=1): step to sigma_down,
                      then re-noise to sigma_next
LCM                   ``FlowMatchLCMScheduler(shift)``: predict x0, re-noise fully    (own)        yes
DDPM                  ``FlowDPMSolverMultistepScheduler(sde-dpmsolver++, order 1,     trailing     yes
                      FLOW)``: first-order SDE-DPM-Solver++ is DDPM's ancestral
                      posterior step (= DDIM eta=1)
PNDM                  ``FlowDPMSolverMultistepScheduler(dpmsolver++, order 3, FLOW)`` trailing     -
                      (DPM++ 3M): PNDM is a linear-multistep method; no flow PNDM
                      exists and this is the closest third-order linear multistep
UniPC                 ``FlowUniPCMultistepScheduler(order 2, bh2, FLOW)``              trailing     -
DPM++ 2M Karras       ``FlowDPMSolverMultistepScheduler(dpmsolver++, order 2, FLOW)`` karras       -
DPM++ 2M SDE Karras   ``FlowDPMSolverMultistepScheduler(sde-dpmsolver++, order 2,    karras       yes
                      FLOW)``
DPM++ 2M SDE Expon.   same, exponential spacing                                      exponential  yes
DPM++ SDE Karras      ``FlowDPMSolverSinglestepScheduler(sde-dpmsolver++, order 2,   karras       yes
                      FLOW)``: an approximation (see below)
====================  =============================================================  ===========  =====

Grids (all in flow sigma, all followed by a terminal 0, ``shift`` = 3.0 by default):

* ``euler``: ``FlowMatchEulerDiscreteScheduler``'s own grid, ``shift(linspace(1, shift(1/1000), N))``;
  it ends at about 0.009, so the last step is short.
* ``trailing``: the official Kandinsky grid ``shift(linspace(1, 0, N + 1)[:-1])``; it ends at
  ``shift(1/N)`` (0.136 at 20 steps) and the last step jumps straight to the x0 estimate. The stock
  ``use_flow_sigmas`` grid of DPM-Solver/UniPC is this grid up to 1/1000, but with the timesteps
  truncated to int64, so the model would see a sigma up to 1/1000 off the one the solver uses.
* ``karras`` / ``exponential``: Karras (rho = 7) or log-uniform spacing of the *flow* sigmas between
  1 and the ``euler`` grid's last sigma, as ``FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)``
  (resp. ``use_exponential_sigmas``) builds them. The stock ``use_karras_sigmas=True`` of DPM-Solver
  instead builds VP sigmas (157 down to 0.01) and then applies flow maths to them, which gives NaN.

Why the log-SNR solvers converge: DPM-Solver++ and UniPC with ``use_flow_sigmas`` use
``alpha = 1 - sigma``, ``lambda = log(alpha / sigma)`` and the data prediction
``x0 = x - sigma * v``, which is exact for rectified flow; with ``final_sigmas_type="zero"`` their last
step is first order and returns the x0 estimate. ``lambda`` is -inf at sigma = 1, so on those solvers
the first sigma is capped at ``1 - 1e-6`` (timestep 999.999); starting unit noise "at" that sigma
instead of 1 changes nothing measurable.

DPM++ SDE Karras: k-diffusion's sampler is a *single-step* second-order SDE solver (a midpoint
model evaluation per step, 2 NFE/step, Brownian-tree noise) and only exists in diffusers for VP
models (``DPMSolverSDEScheduler``, which also needs torchsde). The closest flow-capable relative is
the singlestep SDE-DPM-Solver++ of order 2: it pairs consecutive Karras grid points into one
second-order step whose intermediate point plays the role of the midpoint. It keeps 1 NFE per
requested step, so N steps here match k-diffusion's DPM++ SDE Karras at N/2 steps (same cost).
Its noise at the intermediate and final point is drawn independently rather than from one Brownian
path.

Measured with the exact velocity of a Gaussian data distribution (tests/test_schedulers.py), 20 steps:
the second-order ODE solvers (DPM++ 2M Karras, PNDM, UniPC) reach the exact ODE endpoint within
~2 %, the first-order ones (Euler, DDIM, Euler Trailing) within ~9 %. DPM++ 2M SDE Karras/Exponential
reproduce the data spread (std ratio 0.98-1.0); Euler a, DDPM (first order) and DPM++ SDE Karras
(second order over pairs of steps) shrink it (0.79 at 20 steps, 0.88-0.90 at 50; deterministic Euler:
0.86 / 0.95) and want more steps; LCM keeps only ~0.6 of it at any step count, as expected for a model that is not
consistency-distilled.

Stochastic samplers draw their noise through ``scheduler_step(..., generator)``: pass the request's
generator (or one generator per batch item), so that a seed reproduces the image and image i of a
batch equals image i generated alone. All schedulers are stateful (step index, multistep history):
``make_scheduler`` returns a new instance on every call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    LTXEulerAncestralRFScheduler,
    UniPCMultistepScheduler,
)

__all__ = [
    "DEFAULT_SCHEDULER",
    "SCHEDULER_NAMES",
    "FlowDPMSolverMultistepScheduler",
    "FlowDPMSolverSinglestepScheduler",
    "FlowEulerAncestralScheduler",
    "FlowEulerScheduler",
    "FlowGridMixin",
    "FlowUniPCMultistepScheduler",
    "flow_sigmas",
    "is_stochastic",
    "make_scheduler",
    "resolve_scheduler_name",
    "scheduler_step",
]


# The pipeline's own default (FlowMatch Euler, shift 3), used when a request names no scheduler.
DEFAULT_SCHEDULER = "Euler"

GRIDS = ("euler", "trailing", "karras", "exponential")


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(
    num_steps: int, spacing: str, *, shift: float = 3.0, num_train_timesteps: int = 1000
) -> np.ndarray:
    """Descending flow sigmas for `num_steps` steps (float64, without the terminal 0)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if spacing == "trailing":
        return _shift(np.linspace(1.0, 0.0, num_steps + 1)[:-1], shift)
    options = {
        "euler": {},
        "karras": {"use_karras_sigmas": True},
        "exponential": {"use_exponential_sigmas": True},
    }
    if spacing not in options:
        raise ValueError(f"unknown flow grid {spacing!r}; expected one of {GRIDS}")
    reference = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=num_train_timesteps, shift=shift, **options[spacing]
    )
    reference.set_timesteps(num_steps)
    return reference.sigmas[:-1].double().numpy()


class FlowGridMixin:
    """Makes `set_timesteps(N, device=...)` install the flow grid `flow_sigmas(N, self.flow_grid)`.

    Put it first in the bases. The parent's `set_timesteps` still runs first, so every solver buffer
    and the step index are reset as usual; then `.sigmas` (kept on the parent's device, ending in 0)
    and `.timesteps` (float32, exactly `num_train_timesteps * sigma`) are overwritten.
    The grid and its shift are constructor arguments (`make_scheduler` passes them); the rest go to the
    stock scheduler's own constructor.
    """

    sigma_ceiling: float = 1.0  # log-SNR solvers lower it: lambda = log((1 - sigma) / sigma) needs sigma < 1

    def __init__(self, *args: Any, flow_grid: str = "trailing", flow_grid_shift: float = 3.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flow_grid = flow_grid
        self.flow_grid_shift = flow_grid_shift

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        train_steps = self.config.num_train_timesteps
        grid = flow_sigmas(
            num_inference_steps, self.flow_grid, shift=self.flow_grid_shift, num_train_timesteps=train_steps
        )
        grid[0] = min(grid[0], self.sigma_ceiling)
        self._parent_set_timesteps(num_inference_steps, device, grid)
        self.sigmas = torch.from_numpy(np.append(grid, 0.0)).to(self.sigmas.device, torch.float32)
        self.timesteps = torch.from_numpy(grid * train_steps).to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def _parent_set_timesteps(self, num_inference_steps: int, device, grid: np.ndarray) -> None:
        super().set_timesteps(num_inference_steps, device=device)


class FlowEulerScheduler(FlowGridMixin, FlowMatchEulerDiscreteScheduler):
    """FlowMatch Euler on any flow grid (used for "Euler Trailing").

    Stock FlowMatch reaches the official grid only via `set_timesteps(sigmas=...)`, never passed by the loop.
    """


class FlowEulerAncestralScheduler(FlowGridMixin, LTXEulerAncestralRFScheduler):
    """Rectified-flow Euler ancestral (eta = 1) on a shifted flow grid.

    Stock `LTXEulerAncestralRFScheduler` builds its argument-free grid from a FlowMatch config without
    `shift`, i.e. with shift 1.
    """

    def _parent_set_timesteps(self, num_inference_steps: int, device, grid: np.ndarray) -> None:
        # Its argument-free path also logs a config warning on every call; the explicit one does not.
        sigmas = torch.from_numpy(np.append(grid, 0.0)).float()
        LTXEulerAncestralRFScheduler.set_timesteps(self, device=device, sigmas=sigmas)


class FlowDPMSolverMultistepScheduler(FlowGridMixin, DPMSolverMultistepScheduler):
    """DPM-Solver++ (ODE or SDE) on a flow grid with float timesteps.

    Stock Karras/exponential + flow sigmas gives NaN, and its flow grid feeds int64-truncated timesteps.
    """

    sigma_ceiling = 1.0 - 1e-6


class FlowDPMSolverSinglestepScheduler(FlowGridMixin, DPMSolverSinglestepScheduler):
    """Singlestep (SDE-)DPM-Solver++ on a flow grid; same two stock defects as the multistep solver."""

    sigma_ceiling = 1.0 - 1e-6


class FlowUniPCMultistepScheduler(FlowGridMixin, UniPCMultistepScheduler):
    """UniPC on a flow grid with float timesteps: stock flow UniPC truncates its timesteps to int64."""

    sigma_ceiling = 1.0 - 1e-6


@dataclass(frozen=True)
class _Recipe:
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    grid: str | None = None  # a FlowGridMixin grid; None = the class's own grid
    stochastic: bool = False


_DPM = FlowDPMSolverMultistepScheduler
_RECIPES: dict[str, _Recipe] = {
    "DPM++ 2M Karras": _Recipe(_DPM, dict(algorithm_type="dpmsolver++", solver_order=2), "karras"),
    "DPM++ SDE Karras": _Recipe(
        FlowDPMSolverSinglestepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=True),
        "karras",
        stochastic=True,
    ),
    "DPM++ 2M SDE Exponential": _Recipe(
        _DPM, dict(algorithm_type="sde-dpmsolver++", solver_order=2), "exponential", stochastic=True
    ),
    "DPM++ 2M SDE Karras": _Recipe(
        _DPM, dict(algorithm_type="sde-dpmsolver++", solver_order=2), "karras", stochastic=True
    ),
    "Euler": _Recipe(FlowMatchEulerDiscreteScheduler),
    "Euler a": _Recipe(FlowEulerAncestralScheduler, dict(eta=1.0, s_noise=1.0), "euler", stochastic=True),
    "Euler Trailing": _Recipe(FlowEulerScheduler, grid="trailing"),
    "LCM": _Recipe(FlowMatchLCMScheduler, stochastic=True),
    "DDIM": _Recipe(FlowMatchEulerDiscreteScheduler),
    "DDPM": _Recipe(_DPM, dict(algorithm_type="sde-dpmsolver++", solver_order=1), "trailing", stochastic=True),
    "PNDM": _Recipe(_DPM, dict(algorithm_type="dpmsolver++", solver_order=3), "trailing"),
    "UniPC": _Recipe(FlowUniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2"), "trailing"),
}
# Runware's names in the order of the model page (server.protocol holds the contract; a test ties the two).
SCHEDULER_NAMES: tuple[str, ...] = tuple(_RECIPES)


def _recipe(name: str | None) -> _Recipe:
    if name is None:
        name = DEFAULT_SCHEDULER
    try:
        return _RECIPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown scheduler {name!r}. Allowed (case-sensitive): {', '.join(SCHEDULER_NAMES)}."
        ) from None


def resolve_scheduler_name(name: str) -> str:
    """The canonical Runware spelling of `name`, matched exactly or else case- and space-insensitively."""
    if name in _RECIPES:
        return name
    folded = {" ".join(n.split()).casefold(): n for n in SCHEDULER_NAMES}
    key = " ".join(str(name).split()).casefold()
    if key in folded:
        return folded[key]
    raise ValueError(f"Unknown scheduler {name!r}. Allowed: {', '.join(SCHEDULER_NAMES)}.")


def is_stochastic(name: str | None) -> bool:
    """Whether the sampler draws fresh noise in `step` (then it needs the request's generator)."""
    return _recipe(name).stochastic


def _shift_kwargs(cls: type, shift: float) -> dict[str, Any]:
    stock = next(k for k in cls.__mro__ if "__init__" in vars(k) and k is not FlowGridMixin)  # the diffusers class
    params = inspect.signature(stock.__init__).parameters
    if "flow_shift" in params:  # DPM-Solver / UniPC: VP solvers with a flow mode
        return dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    if "shift" in params:  # native flow-matching schedulers
        return dict(shift=shift)
    return {}  # the RF Euler-ancestral scheduler gets its shift only through FlowGridMixin


def make_scheduler(name: str | None, *, shift: float = 3.0, num_train_timesteps: int = 1000):
    """A new scheduler for the Runware scheduler `name` (None = the default, FlowMatch Euler)."""
    recipe = _recipe(name)
    kwargs = dict(recipe.kwargs, num_train_timesteps=num_train_timesteps, **_shift_kwargs(recipe.cls, shift))
    if recipe.grid is not None:
        kwargs |= {"flow_grid": recipe.grid, "flow_grid_shift": shift}
    return recipe.cls(**kwargs)


@functools.cache
def _step_takes_generator(cls: type) -> bool:
    return "generator" in inspect.signature(cls.step).parameters


def scheduler_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | float,
    sample: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """One sampler step; returns the next sample.

    `generator` (one, or a list with one per batch item) is passed to `step` when it accepts one;
    diffusers' `randn_tensor` then draws item i's noise from generator i, so batch items are
    independent of each other and reproduce from their own seed.
    """
    if generator is not None and _step_takes_generator(type(scheduler)):
        return scheduler.step(model_output, timestep, sample, generator=generator, return_dict=False)[0]
    return scheduler.step(model_output, timestep, sample, return_dict=False)[0]
