"""Deep ensemble over finished runs: ``mobseg predict --method ensemble`` (no new training).

The members are the predictions of one run tag over several seeds (default:
the fine-tuned deterministic control, tag ``deterministic``; any tag, e.g.
``mob-b3-r16``, is allowed). The ensemble is built from the members' exported
maps per case, voxel by voxel, with equal weights 1/M. For member m write p_m
= E_m[p] (``_prob``), v_m = Var_m[p] (``_var``), H_m = H(p_m) (``_entropy``)
and I_m its mutual information (``_mi``), so that E_m[H(p)] = H_m - I_m. The
ensemble's predictive distribution is the mixture over members of the
members' distributions of p. Written per case, as a predictions folder with
the file names of ``mobseg predict``:

- ``_prob``: E[p] = (1/M) sum_m p_m;
- ``_var``: the mixture's Var[p] = within + between (law of total variance);
- ``_var_within`` (aleatoric part): (1/M) sum_m v_m;
- ``_var_between`` (epistemic part): (1/M) sum_m (p_m - E[p])^2 (ddof = 0);
- ``_entropy``: H(E[p]) (two classes: the binary entropy, nats);
- ``_expected_entropy`` (aleatoric part): E[H(p)] = (1/M) sum_m (H_m - I_m);
- ``_mi`` (epistemic part): H(E[p]) - E[H(p)], the mixture's mutual information;
- ``_mi_between``: H(E[p]) - (1/M) sum_m H_m, the part from the members'
  disagreement alone (the classical deep-ensemble MI; equals ``_mi`` for
  point-mass members);
- ``_seg``: E[p] > 0.5 (uint8);
- ``_sample<k>``, k = 0..M-1: member k's segmentation ``_seg`` (a draw of the
  mixture's member index; the case-level volume CV then is the members').

Exactness: every map is an exact function of the members' files (float64
sums, stored as float32), so it is as exact as those files; E[H] inherits the
members' MI, which ``predict`` clips at 0, and ``_mi``/``_mi_between`` are
clipped at 0 against rounding. Two-class (single organ) predictions only.

Manifest: ``predict/<organ>/ensemble-<member tag>/seed0`` (``/val`` with
``split="val"``), its params naming the members' seeds; the members' predict
records are its inputs, so re-predicting a member makes it stale. Its
``seconds_per_case`` (the prediction's cost) is the sum of the members'
``seconds_per_case`` plus the combination's own time per case (None when a
member did not record one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobseg.errors import ConfigurationError, InvalidInputError
from mobseg.manifest import Manifest, StageRecord
from mobseg.stages.keys import predict_command, predict_split_key, split_prediction_dir
from mobseg.workspace import Workspace

log = logging.getLogger(__name__)

#: Tag prefix of an ensemble's predictions.
ENSEMBLE_PREFIX = "ensemble-"
#: Seed under which an ensemble is recorded (it has no seed of its own).
ENSEMBLE_SEED = 0
#: Maps written per case besides the members' samples.
ENSEMBLE_MAPS: tuple[str, ...] = (
    "prob",
    "var",
    "var_within",
    "var_between",
    "entropy",
    "expected_entropy",
    "mi",
    "mi_between",
)


@dataclass(frozen=True)
class EnsembleParams:
    """Options of ``mobseg predict --method ensemble``.

    Attributes:
        organ: Target structure.
        member: The members' run tag (default: the deterministic control).
        seeds: The members' seeds; None = every seed with a finished prediction.
        split: ``test`` or ``val`` (the members' predictions of that split).
    """

    organ: str
    member: str = "deterministic"
    seeds: tuple[int, ...] | None = None
    split: str = "test"

    @property
    def tag(self) -> str:
        return ENSEMBLE_PREFIX + self.member


def binary_entropy64(p: np.ndarray) -> np.ndarray:
    """-p ln p - (1 - p) ln (1 - p) in float64 (0 ln 0 = 0)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(
            np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
            + np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
        )


class EnsembleAccumulator:
    """Streaming sums over members of one case (one member's maps at a time).

    Args:
        shape: The case's voxel grid.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.m = 0
        self.sum_p = np.zeros(shape, np.float64)
        self.sum_p2 = np.zeros(shape, np.float64)
        self.sum_v = np.zeros(shape, np.float64)
        self.sum_h = np.zeros(shape, np.float64)
        self.sum_eh = np.zeros(shape, np.float64)

    def add(self, prob: np.ndarray, var: np.ndarray, entropy: np.ndarray, mi: np.ndarray) -> None:
        """Add one member: p_m, Var_m[p], H(p_m), MI_m (same shape)."""
        for name, a in (("prob", prob), ("var", var), ("entropy", entropy), ("mi", mi)):
            if np.shape(a) != self.shape:
                raise ValueError(f"member {name} has shape {np.shape(a)}, not {self.shape}.")
        p = np.asarray(prob, dtype=np.float64)
        h = np.asarray(entropy, dtype=np.float64)
        self.sum_p += p
        self.sum_p2 += p * p
        self.sum_v += var
        self.sum_h += h
        self.sum_eh += h - np.asarray(mi, dtype=np.float64)
        self.m += 1

    def maps(self) -> dict[str, np.ndarray]:
        """The ensemble's maps (:data:`ENSEMBLE_MAPS` and ``seg``), float64 (seg uint8)."""
        if self.m == 0:
            raise ValueError("No member was added.")
        m = float(self.m)
        p = self.sum_p / m
        between = np.maximum(self.sum_p2 / m - p * p, 0.0)
        within = self.sum_v / m
        h = binary_entropy64(p)
        eh = self.sum_eh / m
        return {
            "prob": p,
            "var": within + between,
            "var_within": within,
            "var_between": between,
            "entropy": h,
            "expected_entropy": np.maximum(eh, 0.0),
            "mi": np.maximum(h - eh, 0.0),
            "mi_between": np.maximum(h - self.sum_h / m, 0.0),
            "seg": (p > 0.5).astype(np.uint8),
        }


def member_records(manifest: Manifest, params: EnsembleParams) -> list[StageRecord]:
    """The members' finished predict records (sorted by seed).

    Raises:
        MissingStageError: a named seed has no finished prediction.
        ConfigurationError: fewer than two members.
    """
    if params.seeds is not None:
        recs = []
        for seed in params.seeds:
            key = predict_split_key(params.organ, params.member, seed, params.split)
            recs.append(manifest.require(key, _member_command(params, seed)))
    else:
        prefix = f"predict/{params.organ}/{params.member}/seed"
        recs = []
        for rec in manifest.find("predict", prefix):
            rest = rec.key[len(prefix) :]
            seed_text, _, tail = rest.partition("/")
            want_tail = "" if params.split == "test" else params.split
            if seed_text.isdigit() and tail == want_tail and rec.done:
                recs.append(rec)
    recs = [r for r in recs if r.done]
    if len(recs) < 2:
        raise ConfigurationError(
            f"An ensemble needs >= 2 finished predictions of {params.member!r} "
            f"({params.split} split), found {len(recs)}.",
            f"Run `{_member_command(params, 0)}` for several seeds first.",
        )
    return sorted(recs, key=lambda r: int(r.key.split("/")[3].removeprefix("seed")))


def _member_command(params: EnsembleParams, seed: int) -> str:
    cmd = f"mobseg predict --organ {params.organ} --run {params.member} --seed {seed}"
    if params.member in ("deterministic", "diagonal"):
        cmd = predict_command(params.organ, params.member, seed)
    return cmd + (f" --split {params.split}" if params.split != "test" else "")


def _seed_of(rec: StageRecord) -> int:
    return int(rec.key.split("/")[3].removeprefix("seed"))


def run(ws: Workspace, params: EnsembleParams, force: bool = False) -> StageRecord:
    """Build (or reuse) the ensemble's predictions folder and record it.

    Raises:
        ConfigurationError: fewer than two members, an unknown split.
        MissingStageError: a named member seed has no finished prediction.
        InvalidInputError: a member's file is missing, unreadable, on another
            grid, or holds several classes.
    """
    if params.split not in ("test", "val"):
        raise ConfigurationError(f"--split must be test or val, got {params.split!r}.")
    if params.member.startswith(ENSEMBLE_PREFIX):
        raise ConfigurationError("The members of an ensemble cannot be ensembles.")
    manifest = Manifest(ws.manifest_path)
    members = member_records(manifest, params)
    seeds = [_seed_of(r) for r in members]
    key = predict_split_key(params.organ, params.tag, ENSEMBLE_SEED, params.split)
    out_dir = split_prediction_dir(
        ws.prediction_dir(params.organ, params.tag, ENSEMBLE_SEED), params.split
    )
    record_params: dict[str, Any] = {
        "organ": params.organ,
        "ensemble": True,
        "member": params.member,
        "seeds": seeds,
        "head": None,
    }
    if params.split != "test":
        record_params["split"] = params.split
    old = manifest.get(key)
    stale = manifest.stale(old)
    if old is not None and old.done and not force and not stale and old.params == record_params:
        return old
    case_lists = [[str(c) for c in (r.outputs.get("cases") or [])] for r in members]
    cases = sorted(set(case_lists[0]).intersection(*map(set, case_lists[1:])))
    if not cases:
        raise InvalidInputError(f"The members of {params.tag} share no predicted case.")
    dirs = [_resolve(ws, r.outputs["pred_dir"]) for r in members]
    inputs = {"members": [r.key for r in members]}
    with manifest.running("predict", key, record_params, inputs, members) as outputs:
        from mobseg.progress import progress_bar

        start = time.perf_counter()
        with progress_bar(f"ensemble {params.tag}", len(cases)) as advance:
            for case in cases:
                combine_case(dirs, case, out_dir)
                advance(case=case)
        member_costs = [r.outputs.get("seconds_per_case") for r in members]
        cost = None
        if all(isinstance(c, (int, float)) for c in member_costs):
            cost = sum(member_costs) + (time.perf_counter() - start) / len(cases)
        outputs.update(
            pred_dir=str(out_dir),
            cases=cases,
            members=len(members),
            saved_samples=len(members),
            files=["seg", *ENSEMBLE_MAPS, *(f"sample{i}" for i in range(len(members)))],
            seconds_per_case=cost,
        )
    rec = manifest.get(key)
    assert rec is not None
    return rec


def _resolve(ws: Workspace, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else ws.root / p


def combine_case(member_dirs: list[Path], case: str, out_dir: Path) -> None:
    """Write the ensemble's files of ``case`` from the members' folders (seg last)."""
    import SimpleITK as sitk

    from mobseg.data.nifti import check_same_geometry, read_image, write_array

    ref: Any = None
    acc: EnsembleAccumulator | None = None
    segs = []
    for d in member_dirs:
        arrays = {}
        for name in ("prob", "var", "entropy", "mi", "seg"):
            path = d / f"{case}_{name}.nii.gz"
            if not path.is_file():
                raise InvalidInputError("A member's file is missing.", case=case, path=str(path))
            img = read_image(path, case)
            if img.GetNumberOfComponentsPerPixel() != 1:
                raise InvalidInputError(
                    "Ensembles support single-organ (two-class) predictions only.",
                    case=case,
                    path=str(path),
                )
            if ref is None:
                ref = img
            else:
                check_same_geometry(ref, img, case, path, what=f"member {name}")
            arrays[name] = sitk.GetArrayFromImage(img)
        if acc is None:
            acc = EnsembleAccumulator(arrays["prob"].shape)
        acc.add(arrays["prob"], arrays["var"], arrays["entropy"], arrays["mi"])
        segs.append(arrays["seg"])
    assert acc is not None
    maps = acc.maps()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{case}_seg.nii.gz").unlink(missing_ok=True)
    for k, seg in enumerate(segs):
        write_array(seg.astype(np.uint8), ref, out_dir / f"{case}_sample{k}.nii.gz", np.uint8)
    for name in ENSEMBLE_MAPS:
        write_array(maps[name].astype(np.float32), ref, out_dir / f"{case}_{name}.nii.gz")
    write_array(maps["seg"], ref, out_dir / f"{case}_seg.nii.gz", np.uint8)
