"""Make PyPI's torchvision importable beside a CPU build of torch.

PyPI's Linux torchvision wheels are CUDA builds: their compiled ops library
(``torchvision/_C.so``) links against torch's CUDA libraries, which a CPU
build of torch does not ship. torchvision copes with a missing ops library
everywhere except two fake-tensor registrations (``torchvision::nms`` and
``torchvision::qnms``) that it makes unconditionally at import, so
``import torchvision`` raises ``operator torchvision::nms does not exist``,
and with it every package that imports torchvision (timm, torchmetrics, and
through timm nnU-Net's trainer lookup by name and its ``nnUNetv2_*``
commands).

mobseg registers :func:`register` under torch's ``torch.backends`` entry
point group (pyproject.toml), which torch calls at the end of
``import torch`` in every process of the environment. When torchvision is
installed and its ops library does not load, it declares the schemas of the
two operators, without kernels, so torchvision's import completes; the
operators then fail only when called (torchvision's own "Couldn't load
custom C++ ops" error), which neither nnU-Net nor mobseg does. With a
torchvision whose ops load (a CUDA torch, or a CPU torchvision wheel) it
does nothing. ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns torch's entry points
off, and with them this fix.

This module imports torch only and must never raise: torch turns an
exception from an entry point into a failed ``import torch``.
"""

from __future__ import annotations

import importlib.util
import os

#: The operators torchvision registers fake kernels for without checking
#: that its ops library loaded, with the schema both share.
UNGUARDED_OPS: tuple[str, ...] = ("nms", "qnms")
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _ops_library() -> str | None:
    """Path of the installed torchvision's ops library, or None without torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in os.listdir(folder):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                return os.path.join(folder, name)
    return None


def torchvision_ops_load() -> bool | None:
    """Whether the installed torchvision's compiled ops load beside this torch.

    Returns:
        True or False, or None when torchvision (or its ops library) is absent.
    """
    import torch

    path = _ops_library()
    if path is None:
        return None
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError):
        return False
    return True


def register() -> None:
    """Entry point: declare torchvision's unguarded operators when its ops cannot load."""
    try:
        import torch

        if torchvision_ops_load() is not False:
            return
        for op in UNGUARDED_OPS:
            try:
                torch.library.define(f"torchvision::{op}", _SCHEMA)
            except RuntimeError:
                pass  # already declared (a second call in the same process)
    except Exception:  # noqa: BLE001 - an entry point must never break `import torch`
        return
