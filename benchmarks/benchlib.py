"""Process memory readings shared by the benchmark scripts (Linux ``/proc``)."""

from __future__ import annotations

import re
from pathlib import Path


def memory_mb() -> tuple[float, float]:
    """(peak, current) resident memory of this process in MB: VmHWM and VmRSS."""
    text = Path("/proc/self/status").read_text()

    def field(name: str) -> float:
        match = re.search(rf"{name}:\s+(\d+)", text)
        if match is None:
            raise RuntimeError(f"/proc/self/status has no {name}")
        return int(match.group(1)) / 1024

    return field("VmHWM"), field("VmRSS")


def peak_mb() -> float:
    """Peak resident memory (VmHWM) of this process in MB."""
    return memory_mb()[0]


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
