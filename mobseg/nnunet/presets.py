"""Presets: how big the nnU-Net plan is and how long pretraining and fine-tuning run.

Three presets exist:

- ``paper``: the published set-up. nnU-Net's ``nnUNetPlannerResEncL`` plans,
  configuration ``3d_fullres``, nnU-Net's default training for the backbone
  (1000 epochs x 250 iterations), then fine-tuning for 20 epochs x 250
  iterations at batch size 1 with validation on whole volumes after every epoch.
- ``cpu``: a plan derived from nnU-Net's default planner, made small enough for
  2 CPU cores: a plain U-Net with 4 stages of (8, 16, 32, 64) features, a
  32^3 patch and a coarser spacing (1.5 x nnU-Net's target spacing). The
  backbone trains with nnU-Net's trainer for 30 x 25 iterations at an initial
  learning rate of 3e-2 (nnU-Net's 1e-2 is tuned for 250 000 iterations; in
  a schedule of a few hundred it often never leaves the all-background start).
  On the 64^3 phantom the backbone trains in about 2 minutes and each
  fine-tuning run in about 20-30 s on 2 cores.
- ``micro``: the smallest plan that exercises every code path, for tests
  (3 stages of (4, 8, 16) features, 16^3 patch, 2 epochs of 2 iterations).

Every field can be overridden per run (``--epochs``, ``--iterations``) with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mobseg.errors import UnknownNameError

#: Names of the presets, in the order the CLI lists them.
PRESET_NAMES: tuple[str, ...] = ("paper", "cpu", "micro")


@dataclass(frozen=True)
class PlanSpec:
    """How to plan the backbone.

    With ``derived = False`` nnU-Net's planner ``planner`` is used as it is.
    With ``derived = True`` nnU-Net's default planner runs at
    ``spacing_factor`` x the dataset's median spacing, and the resulting
    ``3d_fullres`` configuration is then shrunk: a ``PlainConvUNet`` with
    ``features_per_stage`` (one stage per entry, stride 2 between stages,
    3x3x3 kernels), an isotropic patch of ``patch_size`` voxels per axis (capped
    by the median image size, rounded to a multiple of the total stride) and
    batch size ``batch_size``.

    Attributes:
        planner: nnU-Net planner class name (``nnUNetPlannerResEncL`` or
            ``ExperimentPlanner``).
        plans_name: The plans identifier (the plans file's name).
        configuration: nnU-Net configuration trained (``3d_fullres``).
        derived: Shrink the plan as described above.
        features_per_stage: Features of each encoder stage (derived plans).
        conv_per_stage: Convolutions per encoder stage (derived plans).
        conv_per_stage_decoder: Convolutions per decoder stage (derived plans).
        patch_size: Edge of the cubic patch in voxels (derived plans).
        spacing_factor: Target spacing = factor x nnU-Net's target spacing.
        batch_size: Patches per pretraining step (derived plans).
    """

    planner: str = "nnUNetPlannerResEncL"
    plans_name: str = "nnUNetResEncUNetLPlans"
    configuration: str = "3d_fullres"
    derived: bool = False
    features_per_stage: tuple[int, ...] = (8, 16, 32, 64)
    conv_per_stage: int = 2
    conv_per_stage_decoder: int = 1
    patch_size: int = 32
    spacing_factor: float = 1.0
    batch_size: int = 2


@dataclass(frozen=True)
class Preset:
    """One preset (see the module docstring).

    Attributes:
        name: ``paper``, ``cpu`` or ``micro``.
        plan: How to plan the backbone.
        pretrain_epochs: Backbone epochs (nnU-Net's default: 1000).
        pretrain_iterations: Training iterations per backbone epoch (250).
        pretrain_val_iterations: nnU-Net's patch-validation iterations per epoch (50).
        pretrain_save_every: Write ``checkpoint_latest.pth`` every N epochs.
        pretrain_lr: Initial learning rate of the backbone's SGD (None = nnU-Net's 1e-2).
        finetune_epochs: Fine-tuning epochs (paper: 20).
        finetune_iterations: Iterations per fine-tuning epoch (paper: 250).
        finetune_batch_size: Patches per fine-tuning step (paper: 1).
        val_every: Whole-volume validation every N fine-tuning epochs (and
            always after the last one).
        val_samples: Monte-Carlo samples per tile for the validation Dice.
        grad_clip: Gradient-norm clipping of fine-tuning.
        n_proc_da: nnU-Net's data-augmentation workers (``nnUNet_n_proc_DA``);
            0 runs augmentation in the main process; None lets nnU-Net decide.
        num_processes: Processes for fingerprinting and preprocessing; 1 runs
            them in-process, None uses ``nnUNet_def_n_proc``.
        tile_step_size: Sliding-window step as a fraction of the patch.
        threads: torch CPU threads (None = torch's default).
    """

    name: str
    plan: PlanSpec = field(default_factory=PlanSpec)
    pretrain_epochs: int = 1000
    pretrain_iterations: int = 250
    pretrain_val_iterations: int = 50
    pretrain_save_every: int = 50
    pretrain_lr: float | None = None
    finetune_epochs: int = 20
    finetune_iterations: int = 250
    finetune_batch_size: int = 1
    val_every: int = 1
    val_samples: int = 10
    grad_clip: float = 1.0
    n_proc_da: int | None = None
    num_processes: int | None = None
    tile_step_size: float = 0.5
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER = Preset(name="paper")

CPU = Preset(
    name="cpu",
    plan=PlanSpec(
        planner="ExperimentPlanner",
        plans_name="mobsegCPUPlans",
        derived=True,
        features_per_stage=(8, 16, 32, 64),
        conv_per_stage=2,
        conv_per_stage_decoder=1,
        patch_size=32,
        spacing_factor=1.5,
        batch_size=2,
    ),
    pretrain_epochs=30,
    pretrain_iterations=25,
    pretrain_val_iterations=2,
    pretrain_save_every=1,
    pretrain_lr=3e-2,
    finetune_epochs=4,
    finetune_iterations=25,
    val_every=2,
    val_samples=8,
    n_proc_da=0,
    num_processes=1,
)

MICRO = Preset(
    name="micro",
    plan=PlanSpec(
        planner="ExperimentPlanner",
        plans_name="mobsegMicroPlans",
        derived=True,
        features_per_stage=(4, 8, 16),
        conv_per_stage=1,
        conv_per_stage_decoder=1,
        patch_size=16,
        spacing_factor=2.0,
        batch_size=2,
    ),
    pretrain_epochs=2,
    pretrain_iterations=2,
    pretrain_val_iterations=1,
    pretrain_save_every=1,
    finetune_epochs=2,
    finetune_iterations=2,
    val_every=1,
    val_samples=2,
    n_proc_da=0,
    num_processes=1,
)

_PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, CPU, MICRO)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        UnknownNameError: ``name`` is not one of :data:`PRESET_NAMES`.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise UnknownNameError("preset", name, PRESET_NAMES) from None
