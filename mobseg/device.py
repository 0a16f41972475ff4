"""Choice of the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

from mobseg.errors import ConfigurationError, UnknownNameError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def check_device(name: str) -> None:
    """Refuse an unknown ``--device`` (and an unavailable explicit one) before any work.

    Stages call it first, so the option is checked even when the stage is
    already done. ``auto`` and ``cpu`` need no torch import.

    Raises:
        UnknownNameError: ``name`` is not a known device.
        ConfigurationError: CUDA or MPS was asked for but is not available.
    """
    if name not in DEVICE_CHOICES:
        raise UnknownNameError("device", name, DEVICE_CHOICES)
    if name not in ("auto", "cpu"):
        resolve_device(name)


def check_seed(seed: int | None) -> None:
    """Refuse a negative ``--seed`` (every stage, as prepare does).

    Raises:
        ConfigurationError: ``seed`` < 0.
    """
    if seed is not None and seed < 0:
        raise ConfigurationError(f"--seed must be >= 0, not {seed}.")


def resolve_device(name: str = "auto") -> str:
    """Turn ``--device`` into a concrete torch device type.

    Args:
        name: ``auto`` (CUDA if available, else MPS, else CPU) or an explicit type.

    Returns:
        One of ``"cuda"``, ``"mps"``, ``"cpu"``.

    Raises:
        UnknownNameError: ``name`` is not a known device.
        ConfigurationError: the device was asked for but is not available.
    """
    import torch

    if name not in DEVICE_CHOICES:
        raise UnknownNameError("device", name, DEVICE_CHOICES)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_ok else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "CUDA was requested but no CUDA device is available.",
            "Use --device auto or --device cpu.",
        )
    if name == "mps" and not mps_ok:
        raise ConfigurationError(
            "MPS was requested but is not available on this machine.",
            "Use --device auto or --device cpu.",
        )
    return name
