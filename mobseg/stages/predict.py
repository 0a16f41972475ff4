"""Stage ``predict``: sliding-window inference of the head's distribution (SPEC sections 5, 7).

For each input CT: nnU-Net's preprocessing (the backbone's plans), the
predictor :class:`mobseg.nnunet.predictor.HeadPredictor` (one backbone pass
per tile and mirrored pass, stitched per-voxel parameters of the logit
distribution), and the export of :mod:`mobseg.nnunet.export`, which resamples
those parameters to the CT's exact grid and computes the maps there (exact
quadrature for two classes, Monte Carlo for more).

Which model: the fine-tuned run of ``params.seed`` tagged ``params.run``
(the tag ``mobseg finetune`` printed, e.g. ``mob-b3-r16-lse``; its head is
then read from the finetune record) or, without ``run``, ``params.head.tag()``
(the run with every loss and training option at its default); its
``checkpoint_best.pth``, selected by validation Dice. Or with
``params.backbone`` the pretrained backbone itself (the paper's
"Deterministic" row), registered under the tag ``backbone`` and seed 0.

Files per case in the output folder: ``<case>_seg.nii.gz`` (uint8),
``<case>_prob.nii.gz`` (float32 foreground mean probability),
``<case>_var.nii.gz`` (float32 Var[p] of the foreground),
``<case>_entropy.nii.gz`` (float32 predictive entropy, nats) and
``<case>_mi.nii.gz`` (float32 mutual information, nats); ``save`` chooses
among them and can add ``logits`` (``<case>_logit_mean.nii.gz`` and
``<case>_logit_var.nii.gz``, the mean and variance of eta_1 - eta_0); and with
``save_samples`` = S > 0 for a stochastic model ``<case>_sample<k>.nii.gz``
(uint8 label maps of S joint samples, k = 0..S-1, for GED). Cases whose
files all exist are skipped, so an interrupted run resumes.

Storage (``dtype``, ``--dtype``): the float maps are float32 (default) or
``uint16``, 16-bit integers with NIfTI's scaling x = q * scl_slope +
scl_inter per file (:mod:`mobseg.data.quantized`; NIfTI-1 has no float16),
which every NIfTI reader returns as floats, at most (max - min) / 131070 off
(E[p]: 7.7e-6); multi-class vector maps stay float32. ``nnunet_names``
(``--nnunet-names``, only with ``out``): the segmentation is
``<case>.nii.gz``, nnU-Net's naming, so ``nnUNetv2_evaluate_folder`` reads
``out`` as it is, and every other file goes to ``out/maps/`` (nnU-Net's
evaluation takes every ``.nii.gz`` of the folder for a case).

Case names: ``<case>_0000.nii.gz`` -> ``<case>``; ``<name>.nii.gz`` ->
``<name>``; a TotalSegmentator ``<case>/ct.nii.gz`` -> ``<case>``.

With ``split="val"`` (``--split val``) the organ's validation cases
(``imagesTr``) are predicted instead of the test split, into
``<prediction dir>/val`` under the key ``predict/<organ>/<tag>/seed<S>/val``
(the calibration set of conformal risk control, see ``mobseg evaluate``).

MC dropout: a run fine-tuned with ``--mc-dropout`` (its checkpoint records
``decoder_dropout`` > 0) is predicted with ``passes`` = T stochastic passes
per tile (default :data:`DEFAULT_PASSES`), its decoder's dropout active; the
passes form a mixture carried as its moment-matched Gaussian
(:mod:`mobseg.core.mixture`), and ``<case>_logit_var_between.nii.gz`` holds
the between-pass (epistemic) variance of the logit difference.
``tta_mixture`` (``--tta-mixture``, any run) keeps the mirrored passes as
such a mixture as well; it changes the prediction, so it is recorded under
its own tag ``<tag>-ttamix`` (key ``predict/<organ>/<tag>-ttamix/seed<S>``),
a row of its own in evaluate and report.

Manifest key ``predict/<organ>/<tag>/seed<S>``; outputs: ``pred_dir``,
``cases``, ``maps`` (``quadrature`` for two classes, ``monte-carlo`` for
more), ``samples`` (k per voxel for Monte-Carlo maps, else 0), ``tta``,
``checkpoint``, ``point_mass``, ``mixing``, ``saved_samples`` (S written per
case), ``files`` (suffixes written), ``passes`` (T), ``decoder_dropout``,
``tta_mixture``, ``dtype`` (storage of the float maps), ``maps_dir`` (the
folder of every file but the segmentation), ``seconds_per_case`` (mean wall
time of the cases predicted by this call: preprocessing, inference and
export; None if all were resumed).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mobseg.core.config import MIXING_MODES, HeadConfig
from mobseg.errors import ConfigurationError, InvalidInputError, UnknownNameError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import (
    finetune_command,
    finetune_key,
    predict_key,
    predict_split_key,
    split_prediction_dir,
)
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

#: Splits ``--split`` can predict: (images folder, split name).
SPLIT_IMAGES: dict[str, str] = {"test": "imagesTs", "val": "imagesTr"}

#: Tag (and seed) under which the pretrained backbone's predictions are recorded.
BACKBONE_TAG = "backbone"
BACKBONE_SEED = 0
#: T, stochastic passes per tile of an MC-dropout run.
DEFAULT_PASSES = 10
#: Tag suffix of a prediction whose mirrored passes are kept as a mixture.
TTA_MIXTURE_SUFFIX = "-ttamix"


@dataclass(frozen=True)
class PredictParams:
    """Options of ``mobseg predict``.

    Attributes:
        organ: Target structure.
        head: Identifies the fine-tuned run (method and hyper-parameters).
        seed: Seed of the fine-tuned run.
        input: A CT file or a folder of CTs; None = the organ's test split.
        samples: k, Monte-Carlo samples per voxel, used for C > 2 classes only
            (two-class maps are exact).
        tta: Mirroring test-time augmentation (on by default, as in nnU-Net):
            the mirrored passes' parameters are averaged.
        out: Output folder; None = the workdir's predictions folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        backbone: Predict with the pretrained backbone (tag ``backbone``,
            seed 0) instead of a fine-tuned run; ``head`` and ``seed`` are
            then ignored.
        save_samples: S joint samples written per case as label maps (for GED
            and sample diversity); 0 = none. Ignored for point-mass models.
        save: The maps written per case (:data:`mobseg.nnunet.export.SAVE_CHOICES`);
            the segmentation is always written.
        run: Tag of the fine-tuned run (``RunConfig.tag``); None = ``head.tag()``.
        inference_mixing: ``soft`` or ``hard`` mixing of the bases at
            inference (mob); None = the one the checkpoint recorded.
        split: ``test`` (default) or ``val``: which split of the organ to
            predict when ``input`` is None (``val``: key and folder get a
            ``/val`` suffix).
        passes: T stochastic passes per tile of an MC-dropout run; None =
            :data:`DEFAULT_PASSES` for such a run, 1 otherwise (a run without
            dropout accepts only 1).
        tta_mixture: Keep the mirrored passes as a mixture (tag suffix
            :data:`TTA_MIXTURE_SUFFIX`).
        dtype: Storage of the float maps: ``float32`` or ``uint16`` (scaled,
            see the module docstring).
        nnunet_names: Write the segmentation as ``<case>.nii.gz`` and the
            other files into ``out/maps/`` (needs ``out``).
    """

    organ: str
    head: HeadConfig = field(default_factory=lambda: HeadConfig("mob"))
    seed: int = 0
    input: Path | None = None
    samples: int = 30
    tta: bool = True
    out: Path | None = None
    device: str = "auto"
    backbone: bool = False
    save_samples: int = 0
    save: tuple[str, ...] = ("seg", "prob", "var", "entropy", "mi")
    run: str | None = None
    inference_mixing: str | None = None
    split: str = "test"
    passes: int | None = None
    tta_mixture: bool = False
    dtype: str = "float32"
    nnunet_names: bool = False

    @property
    def run_tag(self) -> str:
        """The tag of the model: the fine-tuned run's, or ``backbone``."""
        if self.backbone:
            return BACKBONE_TAG
        return self.run if self.run is not None else self.head.tag()

    @property
    def tag(self) -> str:
        """The tag of the prediction: the run's, plus ``-ttamix`` with ``tta_mixture``."""
        return self.run_tag + (TTA_MIXTURE_SUFFIX if self.tta_mixture else "")

    @property
    def run_seed(self) -> int:
        return BACKBONE_SEED if self.backbone else self.seed

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["head"] = self.head.to_dict()
        d["input"] = None if self.input is None else str(self.input)
        d["out"] = None if self.out is None else str(self.out)
        d["save"] = list(self.save)
        if self.split == "test":  # records written before --split existed stay equal
            del d["split"]
        for name, default in (
            ("passes", None),
            ("tta_mixture", False),
            ("dtype", "float32"),
            ("nnunet_names", False),
        ):
            if d[name] == default:  # likewise for records written before these options
                del d[name]
        return d


def case_name(path: Path) -> str:
    """Case id of a CT file (see the module docstring)."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith("_0000"):
        name = name[:-5]
    if name == "ct" and path.parent.name:
        name = path.parent.name
    return name


def _ct_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii"))
    )
    if not files:
        files = sorted(folder.glob("*/ct.nii.gz"))
    return files


def resolve_inputs(
    params: PredictParams, test_dir: Path | None, test_cases: list[str]
) -> dict[str, Path]:
    """The CTs to predict, by case id.

    Raises:
        InvalidInputError: a missing input, an empty folder, two files with
            the same case id, or a missing test (or validation) image.
    """
    if params.input is None:
        if test_dir is None:
            raise InvalidInputError(f"No {params.split} split is recorded for this organ.")
        found = {}
        for case in test_cases:
            path = test_dir / f"{case}_0000.nii.gz"
            if not path.is_file():
                raise InvalidInputError(
                    f"A {params.split} image is missing.",
                    case=case,
                    path=str(path),
                    hint="Rerun `mobseg prepare --force` for this organ.",
                )
            found[case] = path
        if not found:
            raise InvalidInputError(f"The organ's {params.split} split is empty; pass --input.")
        return found
    src = Path(params.input)
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = _ct_files(src)
        if not files:
            raise InvalidInputError(
                "The input folder holds no .nii.gz / .nii images.", path=str(src)
            )
    else:
        raise InvalidInputError("The input does not exist.", path=str(src))
    out: dict[str, Path] = {}
    for f in files:
        case = case_name(f)
        if case in out:
            raise InvalidInputError(
                f"Two inputs have the case id {case!r}: {out[case].name} and {f.name}.",
                path=str(src),
            )
        out[case] = f
    return out


def run(
    ws: Workspace, params: PredictParams, force: bool = False, key: str | None = None
) -> StageRecord:
    """Predict probability, variance and entropy maps with the run of ``params``.

    A finished record with the same parameters is returned without work
    (unless ``force``); with other parameters (e.g. another ``--input`` or
    ``--samples``) every case is predicted again and the record is replaced.
    An interrupted run with the same parameters resumes: cases whose files
    all exist are kept.

    Args:
        ws: The workspace.
        params: The options.
        force: Predict every case again.
        key: Record under this key instead of ``predict/<organ>/<tag>/seed<S>``
            (the study's predictions of CTs outside the test split).

    Raises:
        MissingStageError: the fine-tuned run (or the backbone) is missing.
        InvalidInputError: unreadable or missing inputs.
        ConfigurationError: bad options.
    """
    from mobseg.device import check_device, check_seed, resolve_device
    from mobseg.nnunet.context import prepared_dataset, pretrained_model
    from mobseg.nnunet.presets import get_preset

    check_seed(params.seed)
    check_device(params.device)

    if params.samples < 1:
        raise ConfigurationError(f"--samples must be >= 1, got {params.samples}.")
    _check_save(params.save)
    if params.save_samples < 0:
        raise ConfigurationError(f"--save-samples must be >= 0, got {params.save_samples}.")
    if params.inference_mixing not in (None, *MIXING_MODES):
        raise UnknownNameError("mixing mode", str(params.inference_mixing), MIXING_MODES)
    if params.split not in SPLIT_IMAGES:
        raise UnknownNameError("split", params.split, tuple(SPLIT_IMAGES))
    if params.split != "test" and params.input is not None:
        raise ConfigurationError("--split and --input exclude each other.")
    if params.passes is not None and params.passes < 1:
        raise ConfigurationError(f"--passes must be >= 1, got {params.passes}.")
    if params.tta_mixture and not params.tta:
        raise ConfigurationError("--tta-mixture needs the mirrored passes: drop --no-tta.")
    _check_storage(params)
    manifest = Manifest(ws.manifest_path)
    model = pretrained_model(manifest, params.organ)
    tag, seed = params.tag, params.run_seed
    if params.backbone:
        source, checkpoint = model.record, model.checkpoint
    else:
        source = manifest.require(
            finetune_key(params.organ, params.run_tag, seed),
            finetune_command(params.organ, params.head.method, seed, params.head),
        )
        checkpoint = Path(source.outputs["checkpoint_best"])
        recorded = source.params.get("head")
        if params.run is not None and recorded and HeadConfig(**recorded) != params.head:
            params = replace(params, head=HeadConfig(**recorded))  # the run's own head
    if key is None and params.out is not None:
        key = out_key(params.organ, tag, seed, Path(params.out))  # never the study's record
    key = key or predict_split_key(params.organ, tag, seed, params.split)
    old = manifest.get(key)
    force = force or manifest.stale(old)  # a new model: predict every case again
    if old is not None and old.done and not force and old.params == params.to_dict():
        return old
    # other options (--samples, --save-samples, ...): files of the old run are not reused
    force = force or (old is not None and old.params != params.to_dict())
    test_dir: Path | None = None
    test_cases: list[str] = []
    if params.input is None:
        _, data = prepared_dataset(manifest, params.organ)
        test_dir, test_cases = data.raw_dir / SPLIT_IMAGES[params.split], data.splits[params.split]
    inputs = resolve_inputs(params, test_dir, test_cases)
    out_dir = (
        Path(params.out)
        if params.out is not None
        else split_prediction_dir(ws.prediction_dir(params.organ, tag, seed), params.split)
    )
    _check_no_overwrite(inputs, out_dir, params)
    device = resolve_device(params.device)
    preset = get_preset(model.preset)

    from mobseg.nnunet.env import setup_nnunet

    setup_nnunet(ws, preset)
    record_inputs = {"model": source.key, "checkpoint": str(checkpoint)}
    if params.input is not None:
        record_inputs["input"] = str(params.input)
    with manifest.running("predict", key, params.to_dict(), record_inputs, [source]) as outputs:
        outputs.update(
            predict_files(
                model, checkpoint, params, inputs, out_dir, device, preset.tile_step_size, force
            )
        )
    rec = manifest.get(key)
    assert rec is not None
    return rec


def parse_model(spec: str, organ: str | None = None) -> tuple[str, str, int]:
    """``--model``: ``ORGAN/TAG/seedS`` (``seed`` optional, ``/seedS`` may be left out
    for seed 0, ``ORGAN/backbone``) or a run folder ``.../ORGAN/TAG/seedS``.

    Returns:
        (organ, tag, seed); the tag ``backbone`` means the pretrained backbone.

    Raises:
        ConfigurationError: not of that form, or another organ than ``organ``.
    """
    parts = [p for p in Path(spec).expanduser().parts if p not in ("/", "")]
    if parts and re.fullmatch(r"(seed)?\d+", parts[-1]):
        seed = int(parts[-1].removeprefix("seed"))
        parts = parts[:-1]
    else:
        seed = 0
    if len(parts) < 2:
        raise ConfigurationError(
            f"--model {spec!r} is not ORGAN/TAG/seedS or a run folder.",
            "For example --model pancreas/mob-b3-r16/seed0 or --model pancreas/backbone.",
        )
    found_organ, tag = parts[-2], parts[-1]
    if organ is not None and organ != found_organ:
        raise ConfigurationError(f"--model {spec!r} is a model of {found_organ}, not {organ}.")
    return found_organ, tag, seed


def out_key(organ: str, tag: str, seed: int, out: Path) -> str:
    """The record of a prediction into a user's folder: the run's key plus
    ``/out-<8 hex>``, a digest of the folder's absolute path.

    Its own key keeps ``predict/<organ>/<tag>/seed<S>`` (the test split's
    prediction that ``evaluate`` scores) untouched, and ``evaluate``'s study
    mode never reads five-part keys.
    """
    import hashlib

    digest = hashlib.sha256(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:8]
    return f"{predict_key(organ, tag, seed)}/out-{digest}"


def predict_files(
    model: Any,
    checkpoint: Path,
    params: PredictParams,
    inputs: dict[str, Path],
    out_dir: Path,
    device: str,
    tile_step_size: float = 0.5,
    force: bool = False,
) -> dict[str, Any]:
    """Predict ``inputs`` into ``out_dir`` (the work of :func:`run`).

    Returns:
        The stage's outputs (see the module docstring).
    """
    import torch

    from mobseg.core.registry import build_head
    from mobseg.data.nifti import files_complete, verify_nifti_file
    from mobseg.nnunet.env import quiet
    from mobseg.nnunet.export import export_parameters, file_suffixes, maps_folder, output_paths
    from mobseg.nnunet.network import (
        StochasticUNet,
        build_backbone,
        build_network,
        feature_channels,
        load_backbone,
        load_checkpoint_file,
        load_full,
    )
    from mobseg.nnunet.predictor import HeadPredictor
    from mobseg.progress import progress_bar

    pm, cm, dataset_json = model.load()
    _check_reader(pm)
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": ""})))
    if channels != 1:
        raise ConfigurationError(
            f"The dataset has {channels} input channels; mobseg predicts single-channel CTs."
        )
    lm = pm.get_label_manager(dataset_json)
    num_classes = lm.num_segmentation_heads
    ckpt = load_checkpoint_file(checkpoint)
    rate = 0.0 if params.backbone else float(ckpt.get("mobseg", {}).get("decoder_dropout") or 0.0)
    passes = params.passes if params.passes is not None else (DEFAULT_PASSES if rate > 0 else 1)
    if passes > 1 and rate == 0:
        raise ConfigurationError(
            f"--passes {passes} needs a run fine-tuned with --mc-dropout; {params.run_tag} has "
            "no dropout, so its passes would all be equal."
        )
    mixture = passes > 1 or params.tta_mixture
    if mixture and num_classes != 2:
        raise ConfigurationError(
            f"MC dropout and --tta-mixture predict two classes only; this model has {num_classes}."
        )
    save = tuple(params.save)
    if "between" in save and not mixture:
        raise ConfigurationError(
            "--save between is the between-pass variance of MC dropout or --tta-mixture."
        )
    if mixture and "between" not in save:
        save = (*save, "between")
    if params.backbone:
        head_cfg = HeadConfig("deterministic", num_classes=num_classes)
        backbone = build_backbone(pm, cm, channels, num_classes, deep_supervision=False)
        network = StochasticUNet(backbone, build_head(head_cfg, feature_channels(backbone)))
        load_backbone(network, ckpt)
        mixing = None
    else:
        head_cfg = params.head
        network = build_network(
            pm, cm, channels, num_classes, head_cfg, deep_supervision=False, decoder_dropout=rate
        )
        load_full(network, ckpt)
        mixing = params.inference_mixing or ckpt.get("mobseg", {}).get(
            "inference_mixing", head_cfg.mixing
        )
        if hasattr(network.head, "mixing"):
            network.head.mixing = mixing  # mob: the recorded mixing unless overridden
    point_mass = not head_cfg.stochastic
    network = network.to(torch.device(device)).eval()
    if num_classes > 2 and "logits" in params.save:
        raise ConfigurationError(
            f"--save logits writes the logit difference of two classes; this model has "
            f"{num_classes}."
        )
    predictor = HeadPredictor(
        tile_step_size=tile_step_size,
        use_mirroring=params.tta,
        device=device,
        save_samples=params.save_samples,
        passes=passes,
        mc_dropout=rate > 0,
        tta_mixture=params.tta_mixture,
    )
    predictor.setup(
        network,
        pm,
        cm,
        dataset_json,
        ckpt.get("inference_allowed_mirroring_axes"),
        point_mass=point_mass,
    )
    n_saved = predictor.num_saved_samples
    preprocessor = cm.preprocessor_class(verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps_dir = maps_folder(out_dir, params.nnunet_names)
    done: list[str] = []
    seconds: list[float] = []
    with progress_bar(f"predict {params.tag}", len(inputs)) as advance:
        for case, path in inputs.items():
            paths = output_paths(out_dir, case, n_saved, save, params.nnunet_names)
            if not force and files_complete(paths.values(), last=paths["seg"]):
                done.append(case)
                advance(case=case)
                continue
            start = time.perf_counter()
            verify_nifti_file(path, case)
            _clear_case(paths["seg"], maps_dir, case, n_saved)
            try:
                with quiet():
                    data, _, props = preprocessor.run_case([str(path)], None, pm, cm, dataset_json)
            except (RuntimeError, ValueError, OSError) as exc:
                raise InvalidInputError(
                    f"nnU-Net cannot preprocess the image ({type(exc).__name__}: {exc}).",
                    case=case,
                    path=str(path),
                ) from exc
            export_parameters(
                predictor.predict_parameters(data),
                props,
                pm,
                cm,
                num_classes,
                path,
                out_dir,
                case,
                samples=predictor.last_samples,
                save=save,
                mc_samples=params.samples,
                mixture=mixture,
                dtype=params.dtype,
                nnunet_names=params.nnunet_names,
            )
            seconds.append(time.perf_counter() - start)
            done.append(case)
            advance(case=case)
    return {
        "pred_dir": str(out_dir),
        "cases": done,
        "maps": "quadrature" if num_classes == 2 else "monte-carlo",
        "samples": 0 if num_classes == 2 else params.samples,
        "tta": params.tta,
        "checkpoint": str(checkpoint),
        "point_mass": point_mass,
        "mixing": mixing,
        "saved_samples": n_saved,
        "files": [*file_suffixes(save), *(f"sample{i}" for i in range(n_saved))],
        "device": device,
        "passes": passes,
        "decoder_dropout": rate,
        "tta_mixture": params.tta_mixture,
        "dtype": params.dtype,
        "maps_dir": str(maps_dir),
        "seconds_per_case": sum(seconds) / len(seconds) if seconds else None,
    }


def _check_save(save: tuple[str, ...]) -> None:
    """Refuse unknown or repeated map names (the segmentation is implicit)."""
    from mobseg.errors import UnknownNameError
    from mobseg.nnunet.export import SAVE_CHOICES

    for name in save:
        if name not in SAVE_CHOICES:
            raise UnknownNameError("map", name, SAVE_CHOICES)
    if len(set(save)) != len(save):
        raise ConfigurationError(f"--save names a map twice: {','.join(save)}.")


def _check_storage(params: PredictParams) -> None:
    """``--dtype`` is a known storage; ``--nnunet-names`` writes into a user's folder."""
    from mobseg.nnunet.export import DTYPES

    if params.dtype == "float16":
        raise ConfigurationError(
            "NIfTI has no float16 data type (nibabel and SimpleITK refuse it).",
            "Use --dtype uint16: 16-bit integers with NIfTI's scaling, half the bytes, "
            "read back as floats.",
        )
    if params.dtype not in DTYPES:
        raise UnknownNameError("dtype", params.dtype, DTYPES)
    if params.nnunet_names and params.out is None:
        raise ConfigurationError(
            "--nnunet-names needs -o/--out: the study's own prediction folders keep "
            "mobseg's names (evaluate and report read them)."
        )


def _check_no_overwrite(inputs: dict[str, Path], out_dir: Path, params: PredictParams) -> None:
    """Refuse an output file that is one of the input CTs (``-o`` = ``-i`` with plain names)."""
    from mobseg.nnunet.export import output_paths

    sources = {p.resolve() for p in inputs.values()}
    for case in inputs:
        for path in output_paths(out_dir, case, 0, params.save, params.nnunet_names).values():
            if path.resolve() in sources:
                raise ConfigurationError(
                    f"The output {path.name} would overwrite the input CT {path}.",
                    "Give another -o/--out folder.",
                )


def _clear_case(seg: Path, out_dir: Path, case: str, keep: int) -> None:
    """Before a case is (re)predicted: remove its segmentation, the file that marks a
    complete case (so an interruption cannot leave old files looking complete), and
    ``<case>_sample<k>.nii.gz`` with k >= ``keep`` (left by a run with more samples)."""
    seg.unlink(missing_ok=True)
    pattern = re.compile(rf"^{re.escape(case)}_sample(\d+)\.nii\.gz$")
    for f in out_dir.glob(f"{case}_sample*.nii.gz"):
        match = pattern.match(f.name)
        if match and int(match.group(1)) >= keep:
            f.unlink()


def _check_reader(plans_manager: Any) -> None:
    """Exports assume SimpleITK's array order; refuse other nnU-Net readers."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    rw = plans_manager.image_reader_writer_class
    if not issubclass(rw, SimpleITKIO) or issubclass(rw, SimpleITKIOWithReorient):
        raise ConfigurationError(
            f"The plans use nnU-Net's reader {rw.__name__}; mobseg's export needs SimpleITKIO."
        )
