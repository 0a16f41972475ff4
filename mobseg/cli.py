"""The ``mobseg`` command line: parsing and rendering only.

Every command builds a ``*Params`` dataclass and calls the stage's Python API
in :mod:`mobseg.stages`. Heavy libraries (torch, nnunetv2) are imported inside
the stages, so ``mobseg --help`` starts instantly.

Exit status: 0 on success, 1 on a user error (one plain line on stderr; the
traceback only with ``--debug``), 2 on a usage error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from mobseg import __version__, progress
from mobseg.errors import ConfigurationError, MobsegError
from mobseg.workspace import WORKDIR_ENV, Workspace

#: Global flags that take no value: accepted after the command too
#: (``mobseg status -q`` is ``mobseg -q status``).
GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--debug")


class _GlobalFlagsGroup(TyperGroup):
    """The top-level group: moves global flags given after the command before it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            head, tail = args[:cut], args[cut:]
        else:
            head, tail = args, []
        flags = [a for a in head if a in GLOBAL_FLAGS]
        rest = [a for a in head if a not in GLOBAL_FLAGS]
        return super().parse_args(ctx, flags + rest + tail)


app = typer.Typer(
    name="mobseg",
    cls=_GlobalFlagsGroup,
    help=(
        "Segmentation with structured, trustworthy uncertainty: the mixture-of-bases "
        "study (Kampen, Aspe et al., NLDL 2026) on nnU-Net v2.\n\n"
        "Stages chain through <workdir>/manifest.json: prepare -> pretrain -> finetune "
        "-> predict -> evaluate -> report."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

out = Console()
err = Console(stderr=True)
T = TypeVar("T")


class _State:
    workdir: str | None = None
    debug: bool = False
    verbosity: int = 1


state = _State()


def workspace() -> Workspace:
    """The workspace chosen by ``--workdir`` / ``$MOBSEG_WORKDIR``."""
    return Workspace.from_option(state.workdir).ensure()


def _error_line(message: str) -> None:
    # escape: messages hold "[case X, path]", which Rich would read as markup
    err.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn a MobsegError (or a full / read-only disk) into one line and exit 1.

    Ctrl-C prints how to resume and exits 130.
    """
    from mobseg.fsutil import free_space, is_storage_error

    try:
        return fn()
    except MobsegError as exc:
        if state.debug:
            raise
        _error_line(str(exc))
        raise typer.Exit(1) from None
    except OSError as exc:
        if state.debug or not is_storage_error(exc):
            raise
        where = f" ({exc.filename}; {free_space(exc.filename)} there)" if exc.filename else ""
        _error_line(f"{exc.strerror or exc}{where}. Free some space or fix the folder, then rerun.")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if state.debug:
            raise
        err.print("Interrupted; rerun the same command to resume.", highlight=False)
        raise typer.Exit(130) from None


def _print_version(value: bool) -> None:
    if value:
        out.print(f"mobseg {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    workdir: Annotated[
        str | None,
        typer.Option(
            "--workdir",
            "-w",
            envvar=WORKDIR_ENV,
            help="Working directory of the study (manifest, data, runs, report).",
            show_default="./mobseg_work",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only errors and results; no progress bars.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Global options. -q, -v and --debug may also follow the command."""
    state.workdir = workdir
    state.debug = debug
    state.verbosity = 0 if quiet else (2 if verbose else 1)
    progress.set_enabled(not quiet)
    from rich.logging import RichHandler

    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[state.verbosity]
    root = logging.getLogger("mobseg")
    root.handlers[:] = [RichHandler(console=err, show_path=debug, show_time=False)]
    root.setLevel(level)
    root.propagate = False


def _print_record(rec: Any) -> None:
    if state.verbosity == 0 or rec is None:
        return
    outputs = getattr(rec, "outputs", {}) or {}
    out.print(f"[green]{rec.key}[/]: {rec.status}")
    for name, value in outputs.items():
        if isinstance(value, (str, int, float)):
            out.print(f"  {name}: {value}", highlight=False)


# Options shared by several commands ------------------------------------------------
OrganOpt = Annotated[str, typer.Option("--organ", help="Target structure, e.g. pancreas.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the run.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is done.")]
PresetOpt = Annotated[
    str,
    typer.Option("--preset", help="paper (GPU, the published set-up) or cpu (minutes on 2 cores)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
MethodOpt = Annotated[
    str,
    typer.Option("--method", "-m", help="deterministic, diagonal, lowrank, single-basis or mob."),
]
BasesOpt = Annotated[int, typer.Option("--bases", help="M, number of bases (mob).")]
RankOpt = Annotated[int, typer.Option("--rank", help="R, rank of the factor / bases.")]
PartOpt = Annotated[int, typer.Option("--partitions", help="P, blocks per axis (mob).")]
NoiseOpt = Annotated[
    str, typer.Option("--noise", help="voxel, block (mob, single-basis) or global (single-basis).")
]
MixingOpt = Annotated[str, typer.Option("--mixing", help="soft or hard mixing of bases (mob).")]
RunOpt = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="Tag of the fine-tuned run, as finetune printed it (e.g. mob-b3-r16-lse); "
        "overrides --method and the head options.",
    ),
]


def _head(method: str, bases: int, rank: int, partitions: int, noise: str, mixing: str) -> Any:
    from mobseg.core.config import HeadConfig

    return HeadConfig(
        method=method, bases=bases, rank=rank, partitions=partitions, noise=noise, mixing=mixing
    )


def _organ(name: str) -> str:
    from mobseg.data.structures import resolve_organ

    return resolve_organ(name)


# Commands ---------------------------------------------------------------------------
@app.command()
def prepare(
    organ: OrganOpt,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="zenodo (download TotalSegmentator v2.0.1), phantom (synthetic CT with known "
            "truth), or the path of an extracted dataset folder or its zip file.",
        ),
    ] = "zenodo",
    subset: Annotated[
        str, typer.Option("--subset", help="full (1228 scans) or small (102), zenodo only.")
    ] = "full",
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, typer.Option(help="Share held out for testing.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Share of the rest for validation.")] = 0.2,
    min_voxels: Annotated[int, typer.Option(help="Voxels for the organ to count as visible.")] = 1,
    spacing: Annotated[
        float | None, typer.Option(help="Resample to this isotropic spacing (mm).")
    ] = None,
    num_cases: Annotated[int, typer.Option(help="Number of phantom cases.")] = 40,
    size: Annotated[int, typer.Option(help="Edge length of phantom volumes (voxels).")] = 64,
    annotators: Annotated[int, typer.Option(help="Annotator masks per phantom case.")] = 3,
    on_error: Annotated[
        str, typer.Option(help="skip (record a bad case and go on) or fail.")
    ] = "skip",
    zenodo_url: Annotated[
        str, typer.Option(help="Zenodo base URL (or a mirror with Zenodo's API).")
    ] = "https://zenodo.org",
    force: ForceOpt = False,
) -> None:
    """Get the data, keep the scans where the organ is visible, split, write the nnU-Net dataset."""
    from mobseg.stages import prepare as stage

    def go() -> Any:
        params = stage.PrepareParams(
            organ=_organ(organ),
            source=source,
            subset=subset,
            seed=seed,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            min_voxels=min_voxels,
            spacing=spacing,
            num_cases=num_cases,
            size=size,
            annotators=annotators,
            on_error=on_error,
            zenodo_url=zenodo_url,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))
    if state.verbosity == 0:
        return
    table = Table(title="Cases per split after filtering (cf. the paper's Table 1)")
    for col in ("organ", "source", "train", "val", "test", "excluded", "paper tr/val/test"):
        table.add_column(col, no_wrap=True, justify="left" if col == "organ" else "right")
    for row in stage.summary_rows(workspace()):
        paper = row["paper"] if row["source"] != "phantom" else None
        table.add_row(
            row["organ"],
            row["source"],
            *(str(row[k]) for k in ("train", "val", "test", "excluded")),
            "/".join(map(str, paper)) if paper else "-",
        )
    out.print(table)


@app.command()
def pretrain(
    organ: OrganOpt,
    preset: PresetOpt = "paper",
    device: DeviceOpt = "auto",
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Override the preset's iterations per epoch.")
    ] = None,
    num_gpus: Annotated[
        int,
        typer.Option(help="CUDA GPUs for nnU-Net's own DDP training of the backbone (one node)."),
    ] = 1,
    force: ForceOpt = False,
) -> None:
    """Train the deterministic nnU-Net v2 backbone (planning, preprocessing, training)."""
    from mobseg.stages import pretrain as stage

    def go() -> Any:
        params = stage.PretrainParams(
            organ=_organ(organ),
            preset=preset,
            device=device,
            epochs=epochs,
            iterations=iterations,
            num_gpus=num_gpus,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def adopt(
    organ: OrganOpt,
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="nnU-Net's results folder of a trained model: "
            "nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION.",
        ),
    ],
    fold: Annotated[str, typer.Option(help="The fold whose checkpoint to use (0-4 or all).")] = "0",
    checkpoint: Annotated[
        str, typer.Option(help="Checkpoint file in fold_<fold>.")
    ] = "checkpoint_final.pth",
    label: Annotated[
        str | None,
        typer.Option(
            help="The organ's label (name or value) in the model's dataset.json, for a model "
            "with several labels; mobseg fine-tunes a binary head for it."
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="Fine-tuning protocol of the later stages: paper, cpu or micro.")
    ] = "paper",
    force: ForceOpt = False,
) -> None:
    """Use a trained nnU-Net v2 model as the organ's backbone (instead of pretrain).

    Checks plans.json, dataset.json and the checkpoint, preprocesses the organ's
    prepared data with the model's plans, and records the backbone that
    finetune, predict and evaluate use.
    """
    from mobseg.stages import adopt as stage

    def go() -> Any:
        params = stage.AdoptParams(
            organ=_organ(organ),
            model=model,
            fold=fold,
            checkpoint=checkpoint,
            label=label,
            preset=preset,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def finetune(
    organ: OrganOpt,
    method: MethodOpt = "mob",
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    samples: Annotated[int, typer.Option(help="k, samples of the logits per step.")] = 5,
    epochs: Annotated[int | None, typer.Option(help="Override the preset's epochs.")] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Override the preset's iterations per epoch.")
    ] = None,
    seed: SeedOpt = 0,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    mc_loss: Annotated[
        str,
        typer.Option(
            help="mean (paper: mean over the k samples of CE + Dice) or logsumexp (SSN: "
            "-log-mean-exp of the k whole-patch log-likelihoods, divided by the voxels)."
        ),
    ] = "mean",
    antithetic: Annotated[
        bool, typer.Option(help="Draw the k samples as antithetic pairs mu +/- e (k even).")
    ] = False,
    annotators: Annotated[
        str,
        typer.Option(
            help="0 (the label) or all (a random annotator per case per iteration; "
            "sources with several annotators, e.g. the phantom)."
        ),
    ] = "0",
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    lambda_kl: Annotated[float, typer.Option(help="Weight of the KL term.")] = 5e-4,
    freeze_backbone: Annotated[
        bool,
        typer.Option(help="Train the head only; the pretrained backbone stays fixed (SegWithU)."),
    ] = False,
    mc_dropout: Annotated[
        bool,
        typer.Option(
            help="MC-dropout variant: channel dropout (--dropout-rate) after every decoder "
            "convolution during fine-tuning (use with --method deterministic)."
        ),
    ] = False,
    dropout_rate: Annotated[
        float, typer.Option(help="Decoder dropout rate of --mc-dropout.")
    ] = 0.1,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="paper, cpu or micro; default: the backbone's preset."),
    ] = None,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Fine-tune the backbone with a stochastic head (or the deterministic control).

    The run's tag (printed) names it in the workdir; options other than the
    defaults add a suffix (docs/methods.md). Give it to predict and evaluate as --run.
    """
    from mobseg.core.config import LossConfig
    from mobseg.stages import finetune as stage

    def go() -> Any:
        params = stage.FinetuneParams(
            organ=_organ(organ),
            head=_head(method, bases, rank, partitions, noise, mixing),
            loss=LossConfig(
                samples=samples, mc_loss=mc_loss, antithetic=antithetic, lambda_kl=lambda_kl
            ),
            seed=seed,
            preset=preset,
            device=device,
            epochs=epochs,
            iterations=iterations,
            lr=lr,
            annotators=annotators,
            freeze_backbone=freeze_backbone,
            decoder_dropout=dropout_rate if mc_dropout else 0.0,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def predict(
    organ: Annotated[
        str | None,
        typer.Option("--organ", help="Target structure, e.g. pancreas (or give --model)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="The run to predict with: ORGAN/TAG/seedS (e.g. pancreas/mob-b3-r16/seed0, "
            "pancreas/backbone) or its run folder <workdir>/runs/ORGAN/TAG/seedS; replaces "
            "--organ, --run/--method and --seed.",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="deterministic, diagonal, lowrank, single-basis, mob, backbone (the "
            "pretrained network itself, recorded under the tag 'backbone', seed 0), or "
            "ensemble (a deep ensemble of the finished predictions of --members over seeds, "
            "tag 'ensemble-<members>', seed 0; no new training).",
        ),
    ] = "mob",
    seed: SeedOpt = 0,
    input: Annotated[
        Path | None, typer.Option("--input", "-i", help="CT file or folder; default: test split.")
    ] = None,
    samples: Annotated[
        int,
        typer.Option(
            help="k, Monte-Carlo samples per voxel for models with more than two classes "
            "(two-class maps are computed exactly, by quadrature)."
        ),
    ] = 30,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta/--no-tta",
            help="Mirroring test-time augmentation, as in nnU-Net (the mirrored passes' "
            "distributions are averaged).",
        ),
    ] = True,
    disable_tta: Annotated[
        bool, typer.Option("--disable-tta", help="Same as --no-tta (nnU-Net's spelling).")
    ] = False,
    save: Annotated[
        str,
        typer.Option(
            help="Comma-separated maps to write: seg, prob, var, entropy, mi, and logits "
            "(two classes: <case>_logit_mean / _logit_var, the mean and variance of the "
            "logit difference), between (MC dropout / --tta-mixture: the between-pass "
            "variance of the logit difference, always written then). The segmentation is "
            "always written.",
        ),
    ] = "seg,prob,var,entropy,mi",
    dtype: Annotated[
        str,
        typer.Option(
            help="Storage of the float maps: float32, or uint16 (16-bit integers with "
            "NIfTI's scl_slope/scl_inter, read back as floats by every NIfTI reader; half "
            "the bytes, at most (max - min) / 131070 off, e.g. 7.7e-6 for the probability).",
        ),
    ] = "float32",
    nnunet_names: Annotated[
        bool,
        typer.Option(
            "--nnunet-names",
            help="With -o: write the segmentation as <case>.nii.gz (nnU-Net's naming, for "
            "nnUNetv2_evaluate_folder) and the other maps into OUT/maps/.",
        ),
    ] = False,
    save_samples: Annotated[
        int,
        typer.Option(
            help="S joint samples written per case as <case>_sample<k>.nii.gz label maps, "
            "for GED and sample diversity in evaluate (0 = none).",
        ),
    ] = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (its own record: the study's predictions are left as they are).",
        ),
    ] = None,
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    run: RunOpt = None,
    inference_mixing: Annotated[
        str | None,
        typer.Option(
            help="soft or hard mixing of the bases at inference (mob); default: the "
            "checkpoint's recorded mixing."
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="test or val: the organ's split to predict (val: the calibration set of "
            "conformal risk control in evaluate)."
        ),
    ] = "test",
    members: Annotated[
        str, typer.Option(help="Ensemble: the members' run tag (default: the fine-tuned control).")
    ] = "deterministic",
    member_seeds: Annotated[
        str | None,
        typer.Option(help="Ensemble: comma-separated member seeds; default: every predicted seed."),
    ] = None,
    passes: Annotated[
        int | None,
        typer.Option(
            help="MC dropout: T stochastic passes per tile of a run fine-tuned with "
            "--mc-dropout (default 10), kept as a mixture; other runs: 1."
        ),
    ] = None,
    tta_mixture: Annotated[
        bool,
        typer.Option(
            "--tta-mixture",
            help="Keep the mirrored passes as a mixture (their spread adds to the variance; "
            "<case>_logit_var_between holds it); recorded under the tag <tag>-ttamix.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Predict segmentation, probability, variance, entropy and MI maps (one pass per tile)."""
    from mobseg.stages import predict as stage

    if method == "ensemble":
        from mobseg.stages import ensemble

        def ens() -> Any:
            seeds = None
            if member_seeds is not None:
                try:
                    seeds = tuple(int(x) for x in member_seeds.split(",") if x.strip())
                except ValueError as exc:
                    raise ConfigurationError(
                        f"--member-seeds must be comma-separated integers, got {member_seeds!r}."
                    ) from exc
            if organ is None:
                raise ConfigurationError("--method ensemble needs --organ NAME.")
            if dtype != "float32" or nnunet_names:
                raise ConfigurationError(
                    "--method ensemble writes float32 maps with mobseg's names; "
                    "drop --dtype and --nnunet-names."
                )
            params = ensemble.EnsembleParams(_organ(organ), members, seeds, split)
            return ensemble.run(workspace(), params, force=force)

        _print_record(guarded(ens))
        return

    def go() -> Any:
        name, how, which, run_tag = organ, method, seed, run
        if model is not None:
            name, model_tag, which = stage.parse_model(model, organ)
            how, run_tag = ("backbone", None) if model_tag == "backbone" else (method, model_tag)
        if name is None:
            raise ConfigurationError(
                "Say which organ's model predicts: --organ NAME or --model ORGAN/TAG/seedS."
            )
        backbone = how == "backbone"
        params = stage.PredictParams(
            organ=_organ(name),
            head=_head(
                "deterministic" if backbone else how, bases, rank, partitions, noise, mixing
            ),
            backbone=backbone,
            seed=which,
            input=input,
            samples=samples,
            tta=tta and not disable_tta,
            save=tuple(s.strip() for s in save.split(",") if s.strip()),
            out=out_dir,
            device=device,
            save_samples=save_samples,
            run=run_tag,
            inference_mixing=inference_mixing,
            split=split,
            passes=passes,
            tta_mixture=tta_mixture,
            dtype=dtype,
            nnunet_names=nnunet_names,
        )
        return stage.run(workspace(), params, force=force)

    _print_record(guarded(go))


@app.command()
def evaluate(
    organ: Annotated[
        str | None, typer.Option("--organ", help="Study mode: the organ's runs.")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="Study mode: only this method.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Study mode: only this seed.")] = None,
    pred: Annotated[
        Path | None, typer.Option(help="Standalone: folder of <case>_prob.nii.gz.")
    ] = None,
    gt: Annotated[Path | None, typer.Option(help="Standalone: folder of <case>.nii.gz.")] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Standalone: CSV to write.")
    ] = None,
    margin: Annotated[
        int, typer.Option(help="Margin (voxels) of the ROI columns: box of G or S plus it.")
    ] = 10,
    boundary_width: Annotated[
        int, typer.Option(help="Width (voxels) of the boundary band of the case scores.")
    ] = 2,
    alpha: Annotated[
        float,
        typer.Option(
            help="Conformal risk control: bound on the expected FNR of {p >= lambda}, "
            "calibrated on the val predictions (predict --split val)."
        ),
    ] = 0.1,
    bases: BasesOpt = 3,
    rank: RankOpt = 16,
    partitions: PartOpt = 4,
    noise: NoiseOpt = "voxel",
    mixing: MixingOpt = "soft",
    run: RunOpt = None,
    force: ForceOpt = False,
) -> None:
    """Score predictions: Dice, NLL, Brier, ECE/MCE (whole volume and ROI), uncertainty quality."""
    from mobseg.stages import evaluate as stage

    def go() -> Any:
        head = None if method is None else _head(method, bases, rank, partitions, noise, mixing)
        params = stage.EvaluateParams(
            organ=None if organ is None else _organ(organ),
            head=head,
            seed=seed,
            pred=pred,
            gt=gt,
            out=out_file,
            margin=margin,
            run=run,
            boundary_width=boundary_width,
            alpha=alpha,
        )
        # standalone evaluation touches no workdir (it may be absent or read-only)
        ws = Workspace.from_option(state.workdir) if params.standalone else workspace()
        return stage.run(ws, params, force=force)

    for rec in guarded(go) or []:
        _print_record(rec)


@app.command()
def report(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder.")] = None,
    case: Annotated[str | None, typer.Option(help="Case shown in the case panels.")] = None,
) -> None:
    """Regenerate the paper's tables and figures from the runs in the manifest."""
    from mobseg.stages import report as stage

    _print_record(guarded(lambda: stage.run(workspace(), stage.ReportParams(out_dir, case))))


# Study, demo and status (mobseg.study) -----------------------------------------------
StudyJobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="local: jobs at once in worker processes, each pinned to its own GPU when "
        "several exist (default 1: in this process). slurm: most jobs submitted at once "
        "(default: no limit).",
    ),
]


def _render_plan(plan: Any, records: Any, title: str) -> None:
    from mobseg.study import views

    out.print(views.stage_table(plan, records, title=title))
    grid = views.grid_table(plan, records, title="Runs per method and organ")
    if grid is not None:
        out.print(grid)
        out.print(
            "[dim]Seeds per cell; a run is its finetune, predict and evaluate jobs; "
            "running may also mean interrupted (a rerun resumes it).[/]"
        )


def _render_result(result: Any, command: str) -> None:
    """Summary, failure list and exit status of a study run."""
    from mobseg.study import views
    from mobseg.study.runner import format_duration

    ran = len(result.succeeded) + len(result.failed)
    out.print(
        f"{result.total} jobs: {len(result.already_done)} already done, {ran} ran "
        f"({len(result.succeeded)} ok, {len(result.failed)} failed), "
        f"{len(result.skipped)} skipped after a failure, in {format_duration(result.seconds)}.",
        highlight=False,
    )
    table = views.failure_table(result)
    if table is not None:
        out.print(table)
    if result.interrupted:
        err.print(
            f"Interrupted. Finished stages are kept; run `{command}` again to continue.",
            highlight=False,
        )
        if result.left_on_cluster:
            err.print(
                f"{len(result.left_on_cluster)} Slurm job(s) are still queued or running "
                f"({', '.join(result.left_on_cluster[:8])}"
                f"{' ...' if len(result.left_on_cluster) > 8 else ''}); the rerun attaches "
                "to them (or cancel them with scancel).",
                highlight=False,
            )
        raise typer.Exit(130)
    if not result.ok:
        what = []
        if result.failed:
            what.append(f"{len(result.failed)} job(s) failed")
        if result.skipped:
            what.append(f"{len(result.skipped)} were skipped")
        if result.not_started:
            what.append(f"{len(result.not_started)} could not start")
        err.print(
            f"[bold red]Error:[/] {', '.join(what)}. Fix the cause (see the errors and logs "
            f"above), then run `{command}` again: finished jobs are not redone.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command()
def study(
    grid_name: Annotated[
        str,
        typer.Option(
            "--grid",
            help="paper (4 organs x 5 methods x 5 seeds, ablation) or truth (the phantom: "
            "both objectives, noise modes and annotator choices, 3 seeds). Options given "
            "override the grid's.",
        ),
    ] = "paper",
    organs: Annotated[
        list[str] | None,
        typer.Option(
            "--organs",
            help="Organs, repeated or comma-separated. Default: pancreas, gallbladder, "
            "duodenum, adrenal_gland_left (truth grid: pancreas).",
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option("--methods", help="Methods, repeated or comma-separated. Default: all five."),
    ] = None,
    objectives: Annotated[
        list[str] | None,
        typer.Option(
            "--objectives",
            help="Objectives of the stochastic heads: mean, logsumexp (comma-separated). "
            "Default: mean (truth grid: both).",
        ),
    ] = None,
    noises: Annotated[
        list[str] | None,
        typer.Option(
            "--noises",
            help="Noise modes of single-basis and mob: voxel, block. Default: voxel "
            "(truth grid: both).",
        ),
    ] = None,
    annotators: Annotated[
        list[str] | None,
        typer.Option(
            "--annotators",
            help="Annotator choices of every method: 0, all. Default: 0 (truth grid: both).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Fine-tuning learning rate of every run (default the paper's 1e-4)."
        ),
    ] = None,
    antithetic: Annotated[
        bool,
        typer.Option("--antithetic", help="Antithetic pairs in every stochastic run (even k)."),
    ] = False,
    seeds: Annotated[
        int | None,
        typer.Option("--seeds", help="Seeds per configuration (0..N-1). Default 5 (truth: 3)."),
    ] = None,
    bases_ablation: Annotated[
        str | None,
        typer.Option(
            "--bases-ablation",
            help="Values of M for the mob ablation on --ablation-organ: 1..5, 1,2,4 or none. "
            "Default 1..5 (truth grid: none).",
        ),
    ] = None,
    ablation_organ: Annotated[
        str, typer.Option("--ablation-organ", help="Organ of the bases ablation.")
    ] = "pancreas",
    backbone: Annotated[
        bool,
        typer.Option(
            "--backbone/--no-backbone",
            help="Predict and evaluate the pretrained backbone (the paper's Deterministic row).",
        ),
    ] = True,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines",
            help="Add the sampling-based baselines: MC dropout, the deep ensemble and the TTA "
            "mixture of the deterministic control, and mob on a frozen backbone.",
        ),
    ] = False,
    preset: PresetOpt = "paper",
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Data of prepare: zenodo, phantom, DIR or ZIP. Default zenodo (truth: phantom).",
        ),
    ] = None,
    subset: Annotated[str, typer.Option(help="full or small (zenodo only).")] = "full",
    num_cases: Annotated[int | None, typer.Option(help="Phantom cases.")] = None,
    size: Annotated[int | None, typer.Option(help="Phantom edge length (voxels).")] = None,
    device: DeviceOpt = "auto",
    pretrain_epochs: Annotated[
        int | None, typer.Option(help="Override the preset's backbone epochs.")
    ] = None,
    num_gpus: Annotated[
        int, typer.Option(help="GPUs of each pretraining (passed to nnU-Net's DDP).")
    ] = 1,
    epochs: Annotated[
        int | None, typer.Option(help="Override the preset's fine-tuning epochs.")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(help="Override the preset's fine-tuning iterations per epoch.")
    ] = None,
    train_samples: Annotated[int, typer.Option(help="k, logit samples per training step.")] = 5,
    samples: Annotated[int, typer.Option(help="k, logit samples per tile at prediction.")] = 30,
    save_samples: Annotated[
        int,
        typer.Option(help="S sample masks written per test case, for GED (0 = none)."),
    ] = 8,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta/--no-tta",
            help="Mirroring test-time augmentation of every prediction (default on, as in "
            "nnU-Net; off: several times faster predictions on a CPU).",
        ),
    ] = True,
    rank: RankOpt = 16,
    bases: BasesOpt = 3,
    partitions: PartOpt = 4,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            "-x",
            help="local (this machine), slurm (submitit job arrays), or submitit-local "
            "(submitit's local subprocesses, to try the cluster path on one machine).",
        ),
    ] = "local",
    jobs: StudyJobsOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (done / remaining) and stop.")
    ] = False,
    partition: Annotated[
        str | None, typer.Option(help="Slurm partition.", rich_help_panel="Slurm")
    ] = None,
    gpus_per_job: Annotated[
        int,
        typer.Option(
            help="GPUs of a finetune/predict job (pretrain asks for --num-gpus); 0 = CPU nodes.",
            rich_help_panel="Slurm",
        ),
    ] = 1,
    cpus_per_job: Annotated[int, typer.Option(help="CPUs per job.", rich_help_panel="Slurm")] = 8,
    mem_gb: Annotated[
        float | None, typer.Option(help="Memory per job (GB).", rich_help_panel="Slurm")
    ] = None,
    time_min: Annotated[
        int, typer.Option(help="Time limit of a job (minutes).", rich_help_panel="Slurm")
    ] = 24 * 60,
    pretrain_time_min: Annotated[
        int,
        typer.Option(help="Time limit of a pretraining job (minutes).", rich_help_panel="Slurm"),
    ] = 72 * 60,
    array_parallelism: Annotated[
        int, typer.Option(help="Most tasks of one job array at once.", rich_help_panel="Slurm")
    ] = 64,
    retries: Annotated[
        int,
        typer.Option(
            help="Resubmissions of a job that died without a result (time limit, node "
            "failure, preemption).",
            rich_help_panel="Slurm",
        ),
    ] = 1,
    poll: Annotated[
        float, typer.Option(help="Seconds between job status polls.", rich_help_panel="Slurm")
    ] = 30.0,
    setup: Annotated[
        list[str] | None,
        typer.Option(
            help="Shell line run before each job, e.g. 'module load cuda' (repeatable).",
            rich_help_panel="Slurm",
        ),
    ] = None,
    slurm_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra sbatch option KEY=VALUE, e.g. account=abc or qos=high (repeatable).",
            rich_help_panel="Slurm",
        ),
    ] = None,
    logs: Annotated[
        Path | None,
        typer.Option(
            help="Folder of job logs (default <workdir>/study/logs).", rich_help_panel="Slurm"
        ),
    ] = None,
) -> None:
    """Run the whole grid: organs x methods x seeds, the bases ablation, backbone, report.

    Expands the grid into stage jobs (prepare -> pretrain -> finetune -> predict ->
    evaluate -> report), skips what the manifest says is done, goes on past a
    failed job (its dependents are skipped) and lists failures at the end. Safe
    to interrupt and rerun. Defaults are the paper's grid (377 jobs); `--grid
    truth` is the benchmark against the phantom's true label law (239 jobs).
    """
    from mobseg.study import executors as ex
    from mobseg.study import grid

    def build() -> tuple[Any, Any]:
        extra: dict[str, str] = {}
        for item in slurm_arg or []:
            k, sep, v = item.partition("=")
            if not sep or not k.strip():
                raise ConfigurationError(
                    f"--slurm-arg {item!r} is not KEY=VALUE.", "Write e.g. --slurm-arg account=abc."
                )
            extra[k.strip().lstrip("-")] = v.strip()
        spec = grid.grid_spec(
            grid_name,
            organs=grid.resolve_organs(organs) if organs else None,
            methods=grid.resolve_methods(methods) if methods else None,
            objectives=grid.resolve_choices(objectives, "objective"),
            noises=grid.resolve_choices(noises, "noise mode"),
            annotators=grid.resolve_choices(annotators, "annotator choice"),
            lr=lr,
            antithetic=antithetic or None,
            seeds=seeds,
            ablation_bases=None if bases_ablation is None else grid.parse_bases(bases_ablation),
            ablation_organ=_organ(ablation_organ),
            backbone=backbone,
            baselines=baselines,
            preset=preset,
            device=device,
            source=source,
            subset=subset,
            num_cases=num_cases,
            size=size,
            pretrain_epochs=pretrain_epochs,
            num_gpus=num_gpus,
            epochs=epochs,
            iterations=iterations,
            train_samples=train_samples,
            samples=samples,
            save_samples=save_samples,
            tta=tta,
            rank=rank,
            bases=bases,
            partitions=partitions,
        )
        options = ex.ClusterOptions(
            partition=partition,
            gpus=gpus_per_job,
            cpus=cpus_per_job,
            mem_gb=mem_gb,
            time_min=time_min,
            pretrain_time_min=pretrain_time_min,
            array_parallelism=array_parallelism,
            retries=retries,
            poll_s=poll,
            setup=tuple(setup or ()),
            extra=extra,
        )
        return spec, options

    spec, options = guarded(build)
    _run_study(spec, options, executor, jobs, logs, dry_run, command="mobseg study ...")


def _run_study(
    spec: Any,
    options: Any,
    executor: str,
    jobs: int | None,
    logs: Path | None,
    dry_run: bool,
    command: str,
) -> Any:
    """Plan (and unless ``dry_run`` run) ``spec``; returns the StudyResult or None."""
    from mobseg.manifest import Manifest
    from mobseg.study import executors as ex
    from mobseg.study import grid
    from mobseg.study.runner import run_plan

    ws = guarded(workspace)
    plan = guarded(lambda: grid.expand(spec))
    records = guarded(lambda: Manifest(ws.manifest_path).records())
    if dry_run:
        _render_plan(plan, records, title=f"Plan of the study in {ws.root} (dry run)")
        if state.verbosity >= 2:
            for job in plan:
                rec = records.get(job.key)
                if rec is None or not rec.done:
                    out.print(f"  {job.key}  [dim]after {', '.join(job.deps) or '-'}[/]")
        return None
    runner = guarded(lambda: ex.make_executor(executor, ws.root, jobs, options, logs))
    if state.verbosity:
        _render_plan(plan, records, title=f"Study in {ws.root}")
    result = guarded(
        lambda: run_plan(ws, plan, runner, on_start=lambda: grid.save_spec(ws.root, spec))
    )
    _render_result(result, command)
    return result


@app.command()
def demo(
    example: Annotated[
        Path | None,
        typer.Option(
            "--example",
            help="Real CT to predict at the end: a CT file, a case folder or a "
            "TotalSegmentator-style folder. Default ../shared/data/totalseg_example, "
            "skipped with a note when absent.",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="Jobs at once in worker processes, each pinned to its own GPU when several "
            "exist (default 1: in this process).",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per method.")] = 2,
    cases: Annotated[int | None, typer.Option(help="Phantom cases (default 32).")] = None,
    size: Annotated[int | None, typer.Option(help="Phantom edge length (default 64).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
) -> None:
    """The built-in study on a laptop: the phantom at the cpu preset, all five methods.

    Prepare the synthetic phantom (pancreas), pretrain the backbone, fine-tune
    the five methods (mob with 3 bases) for 2 seeds, and beside them the best
    configuration against the truth (mob, logsumexp objective, all annotators,
    lr 3e-3) with a deterministic control trained alike; predict and evaluate
    every run and the backbone, write the report, predict the real example CT,
    and print the best configuration beside the paper's and the report's path.
    Resumable: a rerun continues where it stopped.
    """
    from mobseg.study import demo as d

    def build() -> Any:
        ct, note = d.resolve_example(example)
        if state.verbosity:
            out.print(note, highlight=False)
        return d.demo_spec(
            workspace().root,
            ct,
            seeds=seeds,
            num_cases=cases or d.DEMO_CASES,
            size=size or d.DEMO_SIZE,
        )

    spec = guarded(build)
    result = _run_study(spec, None, "local", jobs, None, dry_run, command="mobseg demo")
    if result is None:
        return
    ws = workspace()
    from mobseg.manifest import Manifest

    rec = Manifest(ws.manifest_path).get("report")
    outputs = (rec.outputs if rec is not None else {}) or {}
    for extra in spec.extra_predictions:
        out.print(f"Prediction of the real CT {extra.input}: {extra.out}", highlight=False)
    rows = guarded(lambda: d.comparison(ws.root, spec))
    table = Table(title="Against the truth: the best configuration beside the paper's")
    table.add_column("run")
    for _, header in d.COMPARISON_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("seeds", justify="right")
    for r in rows:
        cells = ["-" if v != v else f"{v:.4f}" for v in r.values.values()]  # NaN: "-"
        table.add_row(f"{r.label}\n[dim]{r.tag}[/]", *cells, str(r.seeds))
    out.print(table)
    report_path = outputs.get("report_html") or outputs.get("report_md")
    path = Path(report_path) if report_path else ws.report_dir
    if not path.is_absolute():
        path = ws.root / path
    out.print(f"[bold green]Report:[/] {path}", highlight=False)


def _short_time(stamp: str | None) -> str:
    """``2026-11-28T07:44:46+00:00`` as ``11-28 07:44`` (the record's own zone)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp or "").strftime("%m-%d %H:%M")
    except ValueError:
        return stamp or "-"


def _took(started: str | None, finished: str | None) -> str:
    """Wall time between two ISO stamps: ``42s``, ``6m05s``, ``3h12m``; ``-`` when unknown."""
    from datetime import datetime

    try:
        seconds = int(
            (
                datetime.fromisoformat(finished or "") - datetime.fromisoformat(started or "")
            ).total_seconds()
        )
    except (ValueError, TypeError):
        return "-"
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _render_records(records: dict[str, Any], path: Path, outdated_inputs: Any) -> None:
    """``status --records``: one row per stage run, readable in 80 columns.

    The short columns keep their width and the key folds only when longer than
    what is left (about 40 characters); errors and notes, whose length is
    unbounded, are listed under the table as ``key (status): text`` lines.
    """
    table = Table(
        title=f"manifest: {path}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    table.add_column("key", overflow="fold")
    table.add_column("status", no_wrap=True, min_width=8)
    table.add_column("tries", justify="right", no_wrap=True, min_width=5)
    table.add_column("started", no_wrap=True, min_width=11)
    table.add_column("took", justify="right", no_wrap=True, min_width=6)
    colours = {"done": "green", "running": "yellow", "failed": "red", "outdated": "magenta"}
    notes: list[str] = []
    for rec in records.values():
        changed = outdated_inputs(rec, records) if rec.done else []
        shown = "outdated" if changed else rec.status
        colour = colours.get(shown, "white")
        note = f"{', '.join(changed)} ran again since" if changed else (rec.error or "")
        if note:
            notes.append(f"{escape(rec.key)} ([{colour}]{shown}[/]): {escape(note)}")
        table.add_row(
            escape(rec.key),
            f"[{colour}]{shown}[/]",
            str(rec.attempts),
            _short_time(rec.started),
            _took(rec.started, rec.finished),
        )
    out.print(table)
    for line in notes:
        out.print(line, highlight=False)


@app.command()
def status(
    records_view: Annotated[
        bool, typer.Option("--records", help="Every stage run as a table (the manifest).")
    ] = False,
) -> None:
    """Show the study's progress: jobs per stage, and runs per method and organ.

    The grid is the last `mobseg study` / `mobseg demo` of this workdir (or,
    without one, what the manifest holds). `--records` lists every stage run.
    """
    from mobseg.manifest import Manifest, outdated_inputs

    def go() -> None:
        ws = Workspace.from_option(state.workdir)
        records = Manifest(ws.manifest_path).records()  # no lock needed on a read-only disk
        if records_view:
            if not records:
                out.print(f"No stage has run in {ws.root} yet. Start with `mobseg prepare`.")
                return
            _render_records(records, ws.manifest_path, outdated_inputs)
            return
        from mobseg.study import grid

        spec = grid.load_spec(ws.root)
        if spec is not None:
            plan = grid.expand(spec)
            title = f"Study in {ws.root}"
        elif records:
            plan = grid.plan_from_records(records)
            title = f"Stage runs in {ws.root} (no study started here; --records for details)"
        else:
            out.print(
                f"No stage has run in {ws.root} yet. Start with `mobseg demo`, "
                "`mobseg study` or `mobseg prepare`."
            )
            return
        _render_plan(plan, records, title=title)
        failed = [r for r in records.values() if r.status == "failed"]
        if failed:
            out.print(f"[red]{len(failed)} failed[/] (errors: `mobseg status --records`).")
        stale = [k for k, v in plan.status(records).items() if v == "outdated"]
        if stale:
            out.print(
                f"[magenta]{len(stale)} outdated[/]: a stage they were built on ran again; "
                "they count as remaining and are redone when next asked for "
                "(`mobseg status --records` names the direct ones)."
            )

    guarded(go)


def main() -> None:
    """Console-script entry point."""
    if "--debug" in sys.argv[1:]:
        os.environ["MOBSEG_DEBUG"] = "1"
    app()


if __name__ == "__main__":
    main()
