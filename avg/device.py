"""Device and mixed-precision choices, resolved once from a step's params.

Steps pass the strings of their params file (``device: auto``, ``precision: auto``) and get back
torch objects; a request this machine cannot serve fails here, with the key to change, instead of
deep inside a CUDA call.
"""
from __future__ import annotations

import contextlib
import re

import torch

DEVICE_SPECS = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

_FIX_DEVICE = "set the `device` key of the step's params file to 'cpu' or 'auto'"
_FIX_PRECISION = "set the `precision` key of the step's params file to 'fp32', 'bf16' or 'auto'"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a device this machine has."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ValueError(f"device 'mps' was asked for but MPS is not available on this machine: {_FIX_DEVICE}")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ValueError(f"unknown device {spec!r}: expected one of {', '.join(DEVICE_SPECS)}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available on this machine "
                         f"(torch {torch.__version__}): {_FIX_DEVICE}")
    if match.group(1) is None:
        return torch.device("cuda")
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {spec!r} was asked for but this machine has {count} CUDA device(s) "
                         f"(cuda:0..cuda:{count - 1}): {_FIX_DEVICE}")
    return torch.device("cuda", index)


def _cuda_has_bf16(device: torch.device) -> bool:
    # Ampere (sm_80) and later run bf16 natively; earlier cards only emulate it, slowly.
    return torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``auto``: bf16 on CUDA cards that run it natively (same range as fp32, no overflow), else fp16
    on CUDA; fp32 on CPU and MPS, where half precision buys little and costs accuracy.
    """
    device = torch.device(device)
    precision = str(precision).strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_has_bf16(device) else torch.float16
        return None
    if precision == "fp16":
        if device.type == "cpu":
            raise ValueError("precision 'fp16' was asked for on the CPU, where fp16 autocast is slow and "
                             f"unsupported for many ops: {_FIX_PRECISION}, or run on a CUDA device")
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op when ``dtype`` is ``None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """The params-file spelling of an autocast dtype, for metadata."""
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
