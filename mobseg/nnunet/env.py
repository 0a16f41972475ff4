"""Setting up nnU-Net's environment, and keeping its console output in the log.

nnU-Net reads its three folders from environment variables and prints a great
deal with ``print()``. Every stage that touches nnunetv2 calls
:func:`setup_nnunet` first (before importing nnunetv2) and wraps chatty calls
in :func:`quiet`, which sends nnU-Net's stdout to this module's logger at DEBUG
level, so the CLI's progress bars and tables stay readable.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator

from mobseg.nnunet.presets import Preset
from mobseg.workspace import Workspace

log = logging.getLogger("mobseg.nnunet")


def setup_nnunet(ws: Workspace, preset: Preset | None = None) -> dict[str, str]:
    """Point nnU-Net into ``ws`` and apply the preset's process counts.

    ``nnUNet_n_proc_DA`` (data-augmentation workers) is set from the preset
    unless the user set it. Torch's compiler is off unless ``nnUNet_compile``
    is set (the wrapped network with stochastic heads is not compiled).

    Returns:
        The nnU-Net variables now in force.
    """
    env = ws.configure_nnunet_env()
    if preset is not None and preset.n_proc_da is not None:
        os.environ.setdefault("nnUNet_n_proc_DA", str(preset.n_proc_da))
    os.environ.setdefault("nnUNet_compile", "false")
    if preset is not None and preset.threads is not None:
        import torch

        torch.set_num_threads(preset.threads)
    return env


class _LogWriter(io.TextIOBase):
    """A text stream that forwards complete lines to a logger."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger, self.level, self.buf = logger, level, ""

    def write(self, text: str) -> int:  # type: ignore[override]
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.logger.log(self.level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self.buf.strip():
            self.logger.log(self.level, self.buf.rstrip())
        self.buf = ""


@contextlib.contextmanager
def quiet(level: int = logging.DEBUG) -> Iterator[None]:
    """Send everything printed to stdout inside the block to the log."""
    writer = _LogWriter(log, level)
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.flush()
