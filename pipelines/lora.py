"""Per-request LoRA adapters on the Kandinsky 5 transformer.

A request asks for a set of LoRAs, each as ``(model id, weight)``. ``LoraManager.apply`` makes exactly that set
active on the pipeline's transformer, loading files it has not seen yet and keeping at most ``max_loaded``
adapters resident (least recently used are evicted). This module knows nothing about HTTP; the engine turns a
``LoraError`` into a per-task error.

Files
    Model id ``X`` is the file ``<lora_dir>/X.safetensors`` (``resolve_lora_file``). Ids may contain ``:`` and
    ``@`` (AIR ids such as ``civitai:123@456``); anything that could leave the folder is refused, and the real path
    (symlinks resolved) must stay inside the folder. Only safetensors is read (never pickle).

Key formats (``to_diffusers_state_dict``)
    diffusers' ``KandinskyLoraLoaderMixin`` accepts only ``transformer.``-prefixed PEFT keys (and old diffusers
    ``.lora.down/.lora.up``); every other layout "loads" with a warning and changes nothing. Everything is therefore
    normalised here to ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, where ``<module>`` is checked
    against the transformer's real Linear layers:

    * ``transformer.<m>.lora_A.weight`` (diffusers / PEFT, SimpleTuner), ``<m>.lora_A.weight`` (PEFT, no prefix);
    * ``base_model.model.<m>.lora_A.default.weight`` (official Kandinsky training output / ``PeftModel``);
    * ``[transformer.]<m>.lora.down.weight`` / ``.lora.up.weight`` (old diffusers);
    * ``lora_unet_<m with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (kohya); the underscored
      name is mapped back by matching against ``named_modules()``; ``diffusion_model.<m>.lora_down.weight``
      (ComfyUI) too.

    The LoRA scale ``alpha / rank`` (kohya ``.alpha`` keys, or diffusers' ``lora_adapter_metadata`` in the
    safetensors header) is folded into ``lora_B`` (``fold_scales``), so every adapter is loaded with PEFT scaling
    1 and the request weight is the only multiplier. A file none of whose keys match a layer is a ``LoraError``;
    a partial match loads what matches and logs how many keys were left out.

Exact base output
    PEFT's ``Linear.forward`` returns ``base_layer(x)`` untouched when adapters are disabled, and adds nothing for
    an adapter that is not active. ``apply([])`` (and a request whose weights are all 0) therefore calls
    ``disable_lora()``, which gives bit-identical output to a pipeline that never had a LoRA; weight-0 LoRAs are
    simply left out of the active set rather than multiplied by 0. Base weights are never touched or reloaded
    (no fusing). ``enable_lora()`` is called again before ``set_adapters`` because ``set_adapters`` does not
    re-enable layers, and layers created by a later load start enabled while older ones stay disabled.

Threading
    Not for concurrent use with generation: ``apply`` mutates the transformer in place, so ``apply`` and the
    generation that relies on it must run on the same thread, one request at a time (the engine's single
    generation thread). An internal lock only keeps two ``apply`` calls from interleaving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .lora_files import LoraError, resolve_lora_file

log = logging.getLogger("k5serve.lora")

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Prefixes in front of the module name, stripped repeatedly (e.g. "base_model.model.transformer.").
_DOTTED_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.", "model.")
# kohya-style: the module name with "." replaced by "_" after one of these.
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_dit_", "lycoris_")

# <module>.lora_A[.<peft adapter name>].weight; <module>.lora.down.weight; <module>.lora_down.weight; <module>.alpha
_KEY_PATTERNS = (
    (re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"), None),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<ab>down|up)\.weight$"), None),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<ab>down|up)\.weight$"), None),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
)
_DORA = (".dora_scale", ".lora_magnitude_vector")


# ---------------------------------------------------------------------------------------------------------------
# Files (ids -> paths: lora_files.py, torch-free)
# ---------------------------------------------------------------------------------------------------------------
def read_lora_file(path: Path, model_id: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors of a safetensors LoRA file and diffusers' adapter metadata from its header (if any)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ...
        raise LoraError(model_id, f"is not a readable safetensors file ({type(exc).__name__})") from None
    metadata = None
    raw = header.get(METADATA_KEY)
    if raw:
        try:
            metadata = json.loads(raw)
        except ValueError:
            log.warning("LoRA %r: unreadable %s in the file header, ignored", model_id, METADATA_KEY)
    return sd, metadata if isinstance(metadata, dict) else None


# ---------------------------------------------------------------------------------------------------------------
# Key normalisation
# ---------------------------------------------------------------------------------------------------------------
def lora_target_modules(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear of ``model`` a LoRA can target: name -> (in_features, out_features).

    Works before and after PEFT wrapped layers (a wrapped layer is reported under its original name).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # base_layer / lora_A / lora_B inside a PEFT wrapper
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.in_features, module.out_features)
    return out


def _parse_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (module part, "A" | "B" | "alpha"), or None when it is no LoRA key we know."""
    for pattern, kind in _KEY_PATTERNS:
        m = pattern.match(key)
        if m:
            if kind is None:
                kind = {"A": "A", "down": "A", "B": "B", "up": "B"}[m.group("ab")]
            return m.group("m"), kind
    return None


def _module_resolver(module_names: Collection[str]):
    names = set(module_names)
    underscored: dict[str, str | None] = {}
    for name in names:
        u = name.replace(".", "_")
        underscored[u] = None if u in underscored else name  # None: ambiguous

    def resolve(stem: str) -> str | None:
        candidates = [stem]
        changed = True
        while changed:
            changed = False
            for prefix in _DOTTED_PREFIXES:
                if candidates[-1].startswith(prefix):
                    candidates.append(candidates[-1][len(prefix):])
                    changed = True
                    break
        for c in candidates:
            if c in names:
                return c
        for c in candidates:
            for prefix in _UNDERSCORE_PREFIXES:
                if c.startswith(prefix) and underscored.get(c[len(prefix):]):
                    return underscored[c[len(prefix):]]
        return None

    return resolve


def _metadata_scales(metadata: Mapping, modules: Mapping[str, int]) -> dict[str, float]:
    """Per-module ``alpha / r`` from diffusers' adapter metadata (LoraConfig kwargs, maybe ``transformer.``-keyed)."""
    from peft.utils.other import get_pattern_key

    meta = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    try:
        r = meta.get("r")
        alpha = meta.get("lora_alpha", r)
        alpha_pattern = meta.get("alpha_pattern") or {}
        rslora = bool(meta.get("use_rslora", False))
        if alpha is None:
            return {}
        scales = {}
        for module, rank in modules.items():
            key = get_pattern_key(list(alpha_pattern), module)
            a = float(alpha_pattern.get(key, alpha))
            scale = a / math.sqrt(rank) if rslora else a / rank
            if scale != 1.0:
                scales[module] = scale
        return scales
    except (TypeError, ValueError, ZeroDivisionError, re.error):
        log.warning("unusable LoRA adapter metadata %r, assuming alpha == rank", metadata)
        return {}


def to_diffusers_state_dict(
    sd: Mapping[str, torch.Tensor],
    module_names: Collection[str] | Mapping[str, tuple[int, int]],
    *,
    name: str = "<state dict>",
    metadata: Mapping | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Normalise a LoRA state dict of any accepted layout to ``transformer.<module>.lora_A/B.weight`` keys.

    ``module_names`` are the transformer's LoRA-able modules (``lora_target_modules``); given as a mapping to
    ``(in_features, out_features)``, the tensor shapes are checked too. Returns the new state dict and the
    per-module LoRA scales ``alpha / rank`` that differ from 1 (from kohya ``.alpha`` keys, else from diffusers'
    ``metadata``); ``fold_scales`` applies them. Raises ``LoraError`` (naming ``name``) for a file that matches no
    layer, a DoRA file, or inconsistent shapes.
    """
    if any(k.endswith(_DORA) for k in sd):
        raise LoraError(name, "is a DoRA adapter, which this server does not support")
    resolve = _module_resolver(module_names)
    shapes = module_names if isinstance(module_names, Mapping) else None
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    for key, tensor in sd.items():
        parsed = _parse_key(key)
        module = resolve(parsed[0]) if parsed else None
        if module is None:
            unmatched.append(key)
            continue
        slot = parts.setdefault(module, {})
        if parsed[1] in slot:
            raise LoraError(name, f"has two tensors for the same layer: {slot[parsed[1]][0]!r} and {key!r}")
        slot[parsed[1]] = (key, tensor)

    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for module, slot in parts.items():
        if "A" not in slot or "B" not in slot:
            unmatched += [k for k, _ in slot.values()]
            continue
        (_, a), (_, b) = slot["A"], slot["B"]
        if a.ndim == 4 and a.shape[2:] == (1, 1) and b.ndim == 4 and b.shape[2:] == (1, 1):
            a, b = a.flatten(1), b.flatten(1)  # 1x1 "conv" LoRA of a Linear
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(name, f"has inconsistent shapes for {module}: {tuple(a.shape)} and {tuple(b.shape)}")
        if shapes is not None and (a.shape[1], b.shape[0]) != tuple(shapes[module]):
            in_f, out_f = shapes[module]
            raise LoraError(name, f"does not fit this model: {module} is {in_f}->{out_f}, the LoRA is "
                                  f"{a.shape[1]}->{b.shape[0]} (made for another model?)")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoraError(name, f"has non-float tensors for {module}")
        out[f"transformer.{module}.lora_A.weight"] = a
        out[f"transformer.{module}.lora_B.weight"] = b
        ranks[module] = a.shape[0]
        if "alpha" in slot:
            alphas[module] = float(slot["alpha"][1].float().reshape(-1)[0])

    if not out:
        sample = ", ".join(repr(k) for k in list(sd)[:3]) or "none"
        raise LoraError(name, f"matches no layer of this model (keys like {sample})")
    if unmatched:
        log.warning("LoRA %r: %d of %d keys match no layer of this model and were ignored (e.g. %r)",
                    name, len(unmatched), len(sd), unmatched[0])

    if alphas:
        scales = {m: alphas[m] / ranks[m] for m in alphas if alphas[m] != ranks[m]}
    elif metadata:
        scales = _metadata_scales(metadata, ranks)
    else:
        scales = {}
    return out, scales


def fold_scales(sd: Mapping[str, torch.Tensor], scales: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Multiply each module's ``lora_B`` by its scale (in float32), so the adapter loads with scaling 1."""
    out = dict(sd)
    for module, scale in scales.items():
        key = f"transformer.{module}.lora_B.weight"
        if key in out and scale != 1.0:
            out[key] = out[key].float() * scale
    return out


# ---------------------------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Adapter:
    name: str  # the PEFT adapter name
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size) of the file when loaded: a changed file is reloaded
    layers: int
    load_seconds: float


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def adapter_name_for(model_id: str) -> str:
    """A PEFT-safe adapter name (no dots; module-dict key) that is unique per model id."""
    readable = re.sub(r"[^0-9A-Za-z_]+", "_", model_id).strip("_")[:48]
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:10]
    return f"lora_{readable}_{digest}"


class LoraManager:
    """Keeps LoRA adapters loaded on ``pipe.transformer`` and activates the set each request asks for.

    ``apply`` is not safe to call while another thread generates with the same pipeline (see the module
    docstring): call it, then generate, from the one generation thread.
    """

    def __init__(self, pipe, lora_dir: Path | None, max_loaded: int = 8):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.pipe = pipe
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.max_loaded = max_loaded
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()  # model id -> adapter, least recent first
        self._modules: dict[str, tuple[int, int]] | None = None
        self._active: dict[str, float] = {}
        self._lock = threading.Lock()
        self.last_load_seconds = 0.0  # loading cold adapters during the last apply (0 when all were loaded)
        self.last_switch_seconds = 0.0  # activating the set (set_adapters / disable_lora) during the last apply
        self.last_apply_seconds = 0.0  # the whole last apply
        self.last_loaded: list[str] = []  # model ids loaded by the last apply
        self.last_evicted: list[str] = []  # model ids evicted by the last apply

    # -- introspection ----------------------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """Model ids with a resident adapter, least recently used first."""
        return list(self._adapters)

    @property
    def active(self) -> dict[str, float]:
        """Model id -> weight of the adapters the next generation uses (empty: exactly the base model)."""
        return dict(self._active)

    def adapter_name(self, model_id: str) -> str | None:
        entry = self._adapters.get(model_id)
        return entry.name if entry else None

    # -- the request path -------------------------------------------------------------------------------------
    def apply(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make exactly ``loras`` ((model id, weight) pairs) active; ``[]`` restores the exact base model.

        A model id given twice gets the sum of its weights. Raises ``LoraError`` naming the LoRA; on error the
        pipeline is left on the base model (no adapter active).
        """
        with self._lock:
            started = time.perf_counter()
            self.last_load_seconds = self.last_switch_seconds = 0.0
            self.last_loaded, self.last_evicted = [], []
            try:
                wanted: OrderedDict[str, float] = OrderedDict()
                for model_id, weight in loras:
                    weight = float(weight)
                    if not math.isfinite(weight):
                        raise LoraError(model_id, f"has an invalid weight {weight}")
                    wanted[model_id] = wanted.get(model_id, 0.0) + weight
                self._apply(wanted)
            except BaseException:
                self._to_base()
                raise
            finally:
                # peft turns requires_grad on for the active adapters' layers (and off for the base layers it
                # wraps); nothing here trains, and compiled blocks guard on the flag: a flip would recompile
                if getattr(self.pipe.transformer, "_hf_peft_config_loaded", False):
                    self.pipe.transformer.requires_grad_(False)
                self.last_apply_seconds = time.perf_counter() - started

    def _apply(self, wanted: OrderedDict[str, float]) -> None:
        if wanted and self.lora_dir is None:
            raise LoraError(next(iter(wanted)), "cannot be used: LoRA is not enabled on this server")
        paths = {model_id: resolve_lora_file(self.lora_dir, model_id) for model_id in wanted}
        for model_id, path in paths.items():  # a file replaced on disk since it was loaded: load it again
            entry = self._adapters.get(model_id)
            if entry is not None and (entry.path != path or entry.stamp != _stamp(path)):
                log.info("LoRA %r changed on disk: reloading", model_id)
                self._evict(model_id)
        cold = [model_id for model_id in wanted if model_id not in self._adapters]
        self._trim(keep=set(wanted), room=len(cold))
        for model_id in cold:
            entry = self._load(model_id, paths[model_id])
            self._adapters[model_id] = entry
            self.last_loaded.append(model_id)
            self.last_load_seconds += entry.load_seconds
        for model_id in wanted:
            self._adapters.move_to_end(model_id)
        if len(self._adapters) > self.max_loaded:
            log.warning("%d LoRAs requested together, above the cache size of %d", len(wanted), self.max_loaded)

        started = time.perf_counter()
        active = OrderedDict((m, w) for m, w in wanted.items() if w != 0.0)  # weight 0: exactly not applied
        if active:
            self.pipe.enable_lora()
            self.pipe.set_adapters([self._adapters[m].name for m in active], adapter_weights=list(active.values()))
            self._active = dict(active)
        else:
            self._to_base()
        self.last_switch_seconds = time.perf_counter() - started

    def _to_base(self) -> None:
        """No adapter active: PEFT layers then return ``base_layer(x)`` untouched (bit-exact base output)."""
        self._active = {}
        if getattr(self.pipe.transformer, "_hf_peft_config_loaded", False):
            self.pipe.disable_lora()

    def _trim(self, keep: set[str], room: int = 0) -> None:
        """Evict least recently used adapters (never one in ``keep``) until ``room`` more fit in ``max_loaded``."""
        for model_id in list(self._adapters):
            if len(self._adapters) + room <= self.max_loaded:
                break
            if model_id not in keep:
                self._evict(model_id)

    def _evict(self, model_id: str) -> None:
        entry = self._adapters.pop(model_id)
        self._active.pop(model_id, None)
        self.pipe.delete_adapters([entry.name])
        self.last_evicted.append(model_id)
        log.info("LoRA %r unloaded (adapter %s)", model_id, entry.name)

    def _load(self, model_id: str, path: Path) -> _Adapter:
        started = time.perf_counter()
        transformer = self.pipe.transformer
        stamp = _stamp(path)
        sd, metadata = read_lora_file(path, model_id)
        if self._modules is None:
            self._modules = lora_target_modules(transformer)
        sd, scales = to_diffusers_state_dict(sd, self._modules, name=model_id, metadata=metadata)
        dtype = transformer.dtype  # (a property that walks the parameters: read it once)
        sd = {k: v.to(dtype) for k, v in fold_scales(sd, scales).items()}
        name = adapter_name_for(model_id)
        if name in self._peft_adapters():  # left behind by someone else: start clean
            self.pipe.delete_adapters([name])
        try:
            self.pipe.load_lora_weights(sd, adapter_name=name)
        except Exception as exc:
            if name in self._peft_adapters():
                self.pipe.delete_adapters([name])
            log.exception("loading LoRA %r from %s failed", model_id, path)
            raise LoraError(model_id, f"could not be loaded ({type(exc).__name__}: {exc})") from None
        if name not in self._peft_adapters():
            raise LoraError(model_id, "matches no layer of this model")
        _adapter_in_compute_dtype(transformer, name, sd, dtype)
        if transformer.device.type == "cuda":
            torch.cuda.synchronize(transformer.device)
        layers = len(sd) // 2
        seconds = time.perf_counter() - started
        log.info("LoRA %r loaded from %s as %s: %d layers%s in %.3f s", model_id, path.name, name, layers,
                 f", {len(scales)} with alpha/rank != 1" if scales else "", seconds)
        return _Adapter(name=name, path=path, stamp=stamp, layers=layers, load_seconds=seconds)

    def _peft_adapters(self) -> set[str]:
        return set(getattr(self.pipe.transformer, "peft_config", None) or {})

    def unload_all(self) -> None:
        """Delete every adapter this manager loaded (the pipeline is then exactly the base model)."""
        with self._lock:
            self._to_base()
            for model_id in list(self._adapters):
                self._evict(model_id)


def _adapter_in_compute_dtype(transformer, name: str, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """peft makes an adapter's layers in the dtype of the weights they wrap; under --fp8-storage those are stored
    in float8, which LoRA's own matrix products cannot use. Such layers move to the compute dtype and take their
    values again from the file (not from the float8 copy)."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for key, value in sd.items():
            path, sep, rest = key.removeprefix("transformer.").rpartition(".lora_")
            host = modules.get(path) if sep else None
            layers = getattr(host, f"lora_{rest[:1]}", None)
            if not isinstance(layers, torch.nn.ModuleDict) or name not in layers:
                continue
            layer = layers[name]
            if layer.weight.dtype != dtype:
                layer.to(dtype)
                layer.weight.copy_(value)
