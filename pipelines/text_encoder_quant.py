"""`--text-encoder-quant`: the Qwen2.5-VL text encoder (8.3 B parameters, 16.6 GB in bfloat16) loaded quantised,
through the quantisation configs `from_pretrained` already takes (diffusers' `PipelineQuantizationConfig` over
transformers' configs), one library per mode:

* `nf4`: bitsandbytes 4-bit NormalFloat with double quantisation (about 5.9 GB): the only maintained NF4, and what
  the official Kandinsky code offers (`--qwen_quantization`); its matrix products dequantise block by block.
* `int8`: torchao int8 weight-only, a scale per output row (about 9.4 GB): plain per-row int8 computed in the
  model dtype, where bitsandbytes' LLM.int8 splits out outliers (slower), and torchao's tensors move between
  devices (group offloading moves them; bitsandbytes' 8-bit ones do not move at all).
* `fp8`: torchao float8 (e4m3) weight-only, a scale per output row (about 9.4 GB): what ComfyUI ships the encoder
  as; the products run in the model dtype, so any GPU (and the CPU) can, unlike `--quantize fp8`'s FP8 products.

The output layer (`lm_head`) stays unquantised in every mode: transformers' quantisers leave a model's output
embeddings alone. Each mode is refused at start-up, with the option and the reason, where the libraries or the
device cannot run it: one small quantised layer is built and run on the device first (`check_text_encoder_quant`).
"""

from __future__ import annotations

import torch

from .config import TEXT_ENCODER_QUANT

LIBRARY = {"nf4": ("bitsandbytes", "quant"), "int8": ("torchao", "quant"), "fp8": ("torchao", "quant")}


class QuantOptionError(ValueError):
    """A quantisation the device or the installed libraries cannot do; the message says which and why."""


def transformers_config(mode: str, dtype: torch.dtype):
    """The transformers quantisation config of `mode` for a model computing in `dtype`."""
    if mode == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    from transformers import TorchAoConfig

    # set_inductor_config=False: torchao would otherwise change inductor's settings for the whole process.
    return TorchAoConfig(_torchao_config(mode))


def _torchao_config(mode: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def pipeline_quantization(mode: str, dtype: torch.dtype):
    """`quantization_config=` for a Kandinsky 5 pipeline's `from_pretrained`: only `text_encoder` quantised
    (None for "none")."""
    if mode == "none":
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"text_encoder": transformers_config(mode, dtype)})


def check_text_encoder_quant(mode: str, device: torch.device, dtype: torch.dtype, offload: str = "none") -> None:
    """Refuse, with one line naming the option and the reason, a mode this device or install cannot run. Run
    before anything is loaded; it builds one 64x64 quantised layer on `device` and runs it."""
    if mode not in TEXT_ENCODER_QUANT:
        raise QuantOptionError(f"--text-encoder-quant {mode}: choose from {', '.join(TEXT_ENCODER_QUANT)}")
    if mode == "none":
        return
    library, extra = LIBRARY[mode]
    if offload == "sequential":
        raise QuantOptionError(f"--text-encoder-quant {mode} does not work with --offload sequential (its "
                               "per-parameter hooks do not move quantised weights); use --offload group or model")
    if device.type not in ("cuda", "cpu"):
        raise QuantOptionError(f"--text-encoder-quant {mode} runs on CUDA GPUs and the CPU, not on {device}")
    try:
        __import__(library)
    except ImportError:
        raise QuantOptionError(f"--text-encoder-quant {mode} needs {library}: pip install 'k5serve[{extra}]'") \
            from None
    except Exception as exc:  # noqa: BLE001 - a broken install (built for another torch or CUDA)
        raise QuantOptionError(f"--text-encoder-quant {mode}: {library} does not import: "
                               f"{type(exc).__name__}: {exc}") from None
    try:
        _probe(mode, device, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure means the mode cannot run here
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise QuantOptionError(f"--text-encoder-quant {mode}: {library} cannot run on {where} in "
                               f"{str(dtype).removeprefix('torch.')}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _probe(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """One quantised 64x64 linear layer on `device`, run once."""
    x = torch.randn(2, 64, device=device, dtype=dtype)
    if mode == "nf4":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True, quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64, dtype=dtype), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        layer = layer.to(device)
    else:
        from torchao.quantization import quantize_

        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False, device=device, dtype=dtype))
        quantize_(layer, _torchao_config(mode))
    with torch.no_grad():
        layer(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
