"""TeaCache and First Block Cache on Kandinsky 5's visual blocks, as diffusers hooks.

Both use diffusers' hook machinery (`HookRegistry`, `ModelHook`, `StateManager` keyed by the
`transformer.cache_context(name)` our loop enters around each CFG branch), so their state is per branch
and per request, and removing the hooks restores the untouched forward.

* First Block Cache is diffusers' own (`FBCHeadBlockHook` + `FBCBlockHook`). Two things are added: the
  Kandinsky block metadata fix (diffusers 0.42 looks the block input up as "hidden_states", Kandinsky's
  decoder block calls it `visual_embed`), and the Runware window and max-consecutive guard, which diffusers'
  FBC lacks, consulted in the head hook's decision.
* TeaCache is written here: no library implements it for Kandinsky 5 (the TeaCache repository covers other
  models, diffusers and cache-dit do not ship it). Its head hook decides *before* block 0 runs, from the
  timestep-modulated input of block 0, so a reused step skips every visual block; the tail hook stores the
  visual-block residual. Its rescaling polynomial has no published Kandinsky coefficients, hence
  `DEFAULT_TEACACHE_COEFFICIENTS` (the identity) and `k5serve calibrate teacache`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import BaseState, StateManager

from .guard import StepGuard

# Highest degree first (numpy.polyval order): y = x, the raw relative change. Fit real ones with
# `k5serve calibrate teacache`.
DEFAULT_TEACACHE_COEFFICIENTS = (0.0, 0.0, 0.0, 1.0, 0.0)

_HOOK = "k5serve_step_cache"

# (branch, step, indicator change x, residual change y): what calibration fits y ~ poly(x) on.
Recorder = Callable[[str, int, float, float], None]


def rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """The largest per-image relative L1 change in a batch: a batch reuses a step only if every image could."""
    num = (now.float() - before.float()).abs().flatten(1).mean(1)
    den = before.float().abs().flatten(1).mean(1).clamp_min(1e-12)
    return float((num / den).max())


def visual_blocks(transformer) -> Sequence[torch.nn.Module]:
    blocks = transformer.visual_transformer_blocks
    if len(blocks) < 2:
        raise ValueError("step caching needs at least two visual transformer blocks")
    return blocks


def remove_hooks(transformer) -> None:
    for block in transformer.visual_transformer_blocks:
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(_HOOK, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def _register(block: torch.nn.Module, hook: ModelHook) -> None:
    HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, _HOOK)


# --- First Block Cache ---------------------------------------------------------------------------------


def _fix_block_metadata(block: torch.nn.Module) -> None:
    """diffusers' FBC hooks look the block input up by the literal name "hidden_states"; Kandinsky's decoder
    block takes it positionally as `visual_embed`. Teach the block's registry entry both names (idempotent)."""
    metadata = TransformerBlockRegistry.get(type(block))
    indices = getattr(metadata, "_cached_parameter_indices", None) or {}
    if "hidden_states" not in indices:
        metadata._cached_parameter_indices = {"visual_embed": 0, "hidden_states": 0, "text_embed": 1,
                                              "time_embed": 2, "rope": 3, "sparse_params": 4}


class _GuardedFBCHead(FBCHeadBlockHook):
    def __init__(self, state_manager: StateManager, threshold: float, guard: StepGuard):
        super().__init__(state_manager, threshold)
        self.guard = guard

    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        context = self.state_manager.context
        may_reuse = self.guard.may_reuse(context.name, context.step_index)
        # diffusers' rule (batch-mean relative change of block 0's residual > threshold) only when allowed;
        # it also refuses while nothing is cached yet.
        compute = not may_reuse or super()._should_compute_remaining_blocks(hidden_states_residual)
        self.guard.record(context.name, context.step_index, reused=not compute)
        return compute


def install_fbcache(transformer, guard: StepGuard) -> None:
    blocks = visual_blocks(transformer)
    _fix_block_metadata(blocks[0])
    state = StateManager(FBCSharedBlockState, (), {})
    _register(blocks[0], _GuardedFBCHead(state, guard.config.threshold, guard))
    for index, block in enumerate(blocks[1:], start=1):
        _register(block, FBCBlockHook(state, is_tail=index == len(blocks) - 1))
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


# --- TeaCache -------------------------------------------------------------------------------------------


class _TeaState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.previous_indicator: torch.Tensor | None = None
        self.accumulated = 0.0
        self.last_change: float | None = None  # x at this step (for calibration)
        self.head_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.previous_residual: torch.Tensor | None = None
        self.skip = False


def modulated_input(block: torch.nn.Module, visual_embed: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
    """TeaCache's indicator for Kandinsky 5: block 0's self-attention input after timestep modulation
    (the same arithmetic as `Kandinsky5TransformerDecoderBlock.forward`'s first lines)."""
    self_attention_params = torch.chunk(block.visual_modulation(time_embed).unsqueeze(dim=1), 3, dim=-1)[0]
    shift, scale, _ = torch.chunk(self_attention_params, 3, dim=-1)
    return block.self_attention_norm(visual_embed.float()) * (scale.float() + 1.0) + shift.float()


class _TeaHead(ModelHook):
    _is_stateful = True

    def __init__(self, state_manager: StateManager, guard: StepGuard | None, threshold: float,
                 coefficients: Sequence[float]):
        super().__init__()
        self.state_manager = state_manager
        self.guard = guard
        self.threshold = threshold
        self.coefficients = np.asarray(coefficients, dtype=np.float64)

    def new_forward(self, module, visual_embed, text_embed, time_embed, *args, **kwargs):
        context = self.state_manager.context
        state: _TeaState = self.state_manager.get_state()
        indicator = modulated_input(module, visual_embed, time_embed)
        reuse = False
        state.last_change = None
        if state.previous_indicator is not None:
            state.last_change = rel_l1(indicator, state.previous_indicator)
            # A fitted polynomial can dip below 0 outside the x range it was fitted on; never let it pay back.
            state.accumulated += max(0.0, float(np.polyval(self.coefficients, state.last_change)))
            reuse = (self.guard is not None and state.residual is not None
                     and self.guard.may_reuse(context.name, context.step_index)
                     and state.accumulated < self.threshold)
        state.previous_indicator = indicator
        if self.guard is not None:
            self.guard.record(context.name, context.step_index, reused=reuse)
        state.skip = reuse
        if reuse:
            return visual_embed + state.residual
        state.accumulated = 0.0
        state.head_input = visual_embed
        return self.fn_ref.original_forward(visual_embed, text_embed, time_embed, *args, **kwargs)


class _TeaBlock(ModelHook):
    def __init__(self, state_manager: StateManager, is_tail: bool, recorder: Recorder | None):
        super().__init__()
        self.state_manager = state_manager
        self.is_tail = is_tail
        self.recorder = recorder

    def new_forward(self, module, visual_embed, *args, **kwargs):
        state: _TeaState = self.state_manager.get_state()
        if state.skip:
            return visual_embed
        output = self.fn_ref.original_forward(visual_embed, *args, **kwargs)
        if self.is_tail:
            state.previous_residual, state.residual = state.residual, output - state.head_input
            state.head_input = None
            if self.recorder is not None and state.last_change is not None and state.previous_residual is not None:
                context = self.state_manager.context
                self.recorder(context.name, context.step_index, state.last_change,
                              rel_l1(state.residual, state.previous_residual))
        return output


def install_teacache(transformer, guard: StepGuard | None, coefficients: Sequence[float],
                     recorder: Recorder | None = None) -> None:
    """`guard=None` never reuses (calibration: every pass computed, `recorder` sees each step's x and y)."""
    blocks = visual_blocks(transformer)
    state = StateManager(_TeaState, (), {})
    threshold = guard.config.threshold if guard is not None else 0.0
    _register(blocks[0], _TeaHead(state, guard, threshold, coefficients))
    for index, block in enumerate(blocks[1:], start=1):
        _register(block, _TeaBlock(state, is_tail=index == len(blocks) - 1, recorder=recorder))
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
