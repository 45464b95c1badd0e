"""Post-training static int8 quantization of a zoo model, its file, and what it costs to run.

We use torch's FX graph mode, knowingly, though torch 2.13 marks it deprecated: PT2E's
output becomes int8 code only through `torch.compile` or ExecuTorch, while FX mode runs int8
on a CPU as it is. Its deprecation warnings are kept out of the user's way. Backends:
`qnnpack` (the default, ARM boards) and `x86`. The file loads with
`torch.load(weights_only=True)`: no pickled code.
Details: docs/inference.md#int8-with-fx-graph-mode
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.utils.data import TensorDataset

Backend = Literal["qnnpack", "x86"]
BACKENDS: tuple[str, ...] = get_args(Backend)
FORMAT = "edgeddl-int8-v1"


@contextlib.contextmanager
def _quiet_quantization() -> Iterator[None]:
    """Hide torch.ao.quantization's deprecation notices (docs/inference.md, int8)."""
    with warnings.catch_warnings():
        for message in (
            "torch.ao.quantization is deprecated",
            "Please use quant_min and quant_max",
            "torch.quantize_per_tensor, torch.quantize_per_channel",
            "TypedStorage is deprecated",
            "must run observer before",  # load_quantized: scales come from the file
        ):
            warnings.filterwarnings("ignore", message=message)
        yield


def use_backend(backend: str) -> None:
    """Select torch's quantized engine (process-wide: int8 kernels are chosen at call time)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    torch.backends.quantized.engine = backend


def _prepared(model: nn.Module, input_shape: tuple[int, ...], backend: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    use_backend(backend)
    example = (torch.zeros(1, *input_shape),)
    return prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), example)


def quantize_int8(
    model: nn.Module, calibration: torch.Tensor, *, backend: str = "qnnpack", batch_size: int = 64
) -> nn.Module:
    """An int8 copy of `model` whose activation scales come from running `calibration`."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if len(calibration) == 0:
        raise ValueError("calibration needs at least one sample")
    with _quiet_quantization():
        prepared = _prepared(model, tuple(calibration.shape[1:]), backend)
        with torch.no_grad():
            for chunk in calibration.split(batch_size):
                prepared(chunk)
        return convert_fx(prepared)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class QuantizedSpec:
    """What rebuilds a quantized zoo model around its state dict."""

    model: str
    width: int
    input_shape: tuple[int, ...]
    num_classes: int
    backend: str


def quantized_bytes(spec: QuantizedSpec, quantized: nn.Module) -> bytes:
    """The file's contents: spec and quantized state dict, loadable with weights_only=True."""
    buffer = io.BytesIO()
    with _quiet_quantization():
        torch.save(
            {
                "format": FORMAT,
                "model": spec.model,
                "width": spec.width,
                "input_shape": list(spec.input_shape),
                "num_classes": spec.num_classes,
                "backend": spec.backend,
                "state_dict": quantized.state_dict(),
            },
            buffer,
        )
    return buffer.getvalue()


def save_quantized(path: Path, spec: QuantizedSpec, quantized: nn.Module) -> None:
    """Write the quantized model atomically: a reader never sees half a file."""
    from edgeddl.io import write_bytes_atomic

    write_bytes_atomic(path, quantized_bytes(spec, quantized))


def load_quantized(path: Path) -> tuple[nn.Module, QuantizedSpec]:
    """The int8 module `save_quantized` wrote, in eval mode, and its spec; selects its backend.
    A file that is not one raises ValueError with a one-line reason."""
    from torch.ao.quantization.quantize_fx import convert_fx

    from edgeddl.models import build_model

    try:
        with _quiet_quantization():
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many kinds for a damaged file
        raise ValueError(f"{path}: not a readable quantized model ({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: not an edgeddl int8 model (no {FORMAT!r} format tag)")
    spec = QuantizedSpec(
        model=saved["model"],
        width=saved["width"],
        input_shape=tuple(saved["input_shape"]),
        num_classes=saved["num_classes"],
        backend=saved["backend"],
    )
    # Same float model, same qconfig, same fusions: the converted module has the same
    # structure, and the saved scales, zero points and int8 weights replace its defaults.
    model = build_model(
        spec.model, input_shape=spec.input_shape, num_classes=spec.num_classes, width=spec.width
    )
    with _quiet_quantization():
        quantized = convert_fx(_prepared(model, spec.input_shape, spec.backend))  # type: ignore[arg-type]
        try:
            quantized.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ValueError(f"{path}: weights do not fit a {spec.model}: {first}") from None
    return quantized.eval(), spec


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's serialized state dict: what a device downloads and stores."""
    buffer = io.BytesIO()
    with _quiet_quantization():
        torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> float:
    """Fraction of `data` the model classifies right."""
    x, y = data.tensors
    with _quiet_quantization():
        correct = sum(
            int((model(xb).argmax(1) == yb).sum())
            for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
        )
    return correct / len(y)


def latencies_s(
    models: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    *,
    repeats: int = 200,
    warmup: int = 20,
) -> list[float]:
    """Per model, the median seconds for one sample (batch 1) on this CPU with one thread,
    after warm-up. The models take turns call by call, so that other load on the machine
    falls on all of them alike rather than on whichever ran while it lasted."""
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode(), _quiet_quantization():
            for i in range(warmup + repeats):
                for model, kept in zip(models, times, strict=True):
                    start = time.perf_counter()
                    model(x)
                    if i >= warmup:
                        kept.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(kept) for kept in times]
