"""How much memory a kernel computation may use: the default budget of ``implementation="auto"``."""

from __future__ import annotations

import os
import re
from typing import Any

from .arrays import device_of
from .cost_model import device_class

# Of the memory free when the call starts: the rest is headroom for the framework's own
# buffers, allocator fragmentation and whatever else the process holds.
BUDGET_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def host_available() -> int | None:
    """Bytes of host RAM available to a new allocation (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available(backend: Any, like: Any) -> int | None:
    """Free bytes where ``like`` lives: the adapter's ``memory_available(like)`` for a device
    (optional in the protocol), host RAM on a CPU; ``None`` where it cannot be told."""
    probe = getattr(backend, "memory_available", None)
    free = probe(like) if probe is not None else None
    if free is None and device_class(device_of(like)) == "cpu":
        free = host_available()
    return free


def parse_budget(value: Any, name: str = "memory_budget") -> float | None:
    """``None``, a number of bytes, or a string such as ``"2GB"`` / ``"512 MiB"``."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}={value!r} is not a size; expected bytes or a string like '2GB' or '512MiB'")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of bytes (or a string like '2GB'), got {value!r}")
    return float(value)


def default_budget(backend: Any, like: Any) -> float | None:
    """``BUDGET_FRACTION`` of the free memory, or ``None`` (no limit) where it is unknown."""
    free = available(backend, like)
    return None if free is None else BUDGET_FRACTION * free
