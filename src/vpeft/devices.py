"""Device strings from the command line or a definition, checked before any work starts."""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["check_device"]


def check_device(device: str) -> str:
    """Refuse a device string torch cannot parse, or an accelerator this machine does not have."""
    import torch

    choices = "cpu, cuda, cuda:N, mps"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; valid: {choices}") from None
    if dev.type == "cpu":
        return device
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"--device {device!r}: no {dev.type} device is available on this machine; valid: cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {device!r}: this machine has {count} {dev.type} device(s), indices 0..{count - 1}")
    return device
