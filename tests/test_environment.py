"""The environment `make` builds: nnU-Net's own commands, timm and torchmetrics import.

PyPI's torchvision is a CUDA build; beside a CPU torch its ``import`` fails
unless mobseg's torch entry point (mobseg/torch_plugin.py) is installed. These
tests run in subprocesses of the test interpreter, so they see the environment
as a user's shell does, not the test process's already-imported modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_nnunet_plan_and_preprocess_help_runs() -> None:
    exe = BIN / "nnUNetv2_plan_and_preprocess"
    assert exe.exists(), f"{exe} missing: nnunetv2's console scripts are not installed"
    done = subprocess.run([str(exe), "-h"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: nnUNetv2_plan_and_preprocess" in done.stdout
    assert "-pl" in done.stdout  # the planner option, from nnU-Net's own parser


def test_timm_and_torchmetrics_import() -> None:
    done = _python(
        "import timm, torchmetrics, torchvision\n"
        "from torchvision.ops.misc import FrozenBatchNorm2d\n"
        "print(timm.__version__, torchmetrics.__version__)"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.split()) == 2


def test_nnunet_trainer_lookup_by_name() -> None:
    # nnUNetv2_train -tr NAME imports every trainer module (timm-based ones too)
    code = (
        "import os, nnunetv2\n"
        "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class\n"
        "folder = os.path.join(nnunetv2.__path__[0], 'training', 'nnUNetTrainer')\n"
        "cls = recursive_find_python_class(folder, 'nnUNetTrainer_5epochs',"
        " 'nnunetv2.training.nnUNetTrainer')\n"
        "print(cls.__module__, cls.__name__)"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "nnUNetTrainer_5epochs"


def test_entry_point_is_installed() -> None:
    names = {ep.value for ep in entry_points(group="torch.backends")}
    assert "mobseg.torch_plugin:register" in names


@pytest.mark.skipif(torch.version.cuda is not None, reason="the failure is specific to CPU torch")
def test_plugin_is_what_makes_cuda_torchvision_import() -> None:
    from mobseg.torch_plugin import torchvision_ops_load

    loads = torchvision_ops_load()
    if loads is None:
        pytest.fail("torchvision is not installed (timm needs it): rebuild with `make install`")
    if loads:
        pytest.skip("this torchvision's ops load: nothing to fix")
    # Without torch's entry points the import fails as SPEC section 9 records ...
    off = _python("import torchvision", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    assert off.returncode != 0
    assert "torchvision::nms does not exist" in off.stderr
    # ... and calling the plugin by hand before it is enough.
    on = _python(
        "import torch\n"
        "from mobseg.torch_plugin import register\n"
        "register(); register()  # twice in one process is harmless\n"
        "import torchvision\n"
        "try:\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)\n"
        "except RuntimeError as err:\n"
        "    print('nms:', err)\n",
        TORCH_DEVICE_BACKEND_AUTOLOAD="0",
    )
    assert on.returncode == 0, on.stderr[-2000:]
    # the ops themselves stay unavailable, with torchvision's own message
    assert "nms: Couldn't load custom C++ ops" in on.stdout
