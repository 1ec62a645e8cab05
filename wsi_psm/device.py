"""Choosing the torch device: CUDA when present, else Apple MPS, else CPU."""

from __future__ import annotations

import torch

from wsi_psm.cores import usable_cores
from wsi_psm.errors import WsiPsmError


class DeviceError(WsiPsmError):
    """An explicitly requested device is not available on this machine."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def cap_torch_threads() -> None:
    """torch's CPU threads at most the usable cores (:func:`usable_cores`). torch follows the
    affinity mask but not a container's CPU quota: in a pod limited to 4 CPUs on a 64-core node it
    would run 32-64 threads on 4 CPUs' time, throttled."""
    n = usable_cores()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)


def device_label(device: torch.device) -> str:
    """What a run says it ran on: "cpu (2 threads)", "cuda:0 (NVIDIA H200)", "mps"."""
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{i} ({torch.cuda.get_device_name(i)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def select_device(spec: str = "auto") -> torch.device:
    """Resolve ``spec`` ("auto", "cpu", "cuda", "cuda:N", "mps") to an available ``torch.device``
    (and cap torch's CPU threads at the usable cores).

    "auto" prefers CUDA, then MPS, then CPU. An explicit choice that this machine cannot honour raises
    :class:`DeviceError` (a ``WsiPsmError``) rather than silently falling back, so a run that was
    asked to use a GPU never quietly takes hours on a CPU.
    """
    cap_torch_threads()
    s = (spec or "auto").strip().lower()
    if s == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} requested but CUDA is not available on this machine"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {spec!r} requested but only {n} CUDA device(s) are present")
        return dev
    if dev.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {spec!r} requested but Apple MPS is not available")
        return dev
    raise DeviceError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
