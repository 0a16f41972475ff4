"""A synthetic abdominal CT phantom whose label distribution is known exactly.

Each case is a cube of ``size``^3 voxels covering ``fov_mm`` (default 320 mm,
so 5 mm voxels at 64^3), RAS like TotalSegmentator (SimpleITK direction
``diag(-1, -1, 1)``), int16 HU: air (-1000) around an elliptic body with
subcutaneous fat (-100), an abdominal wall (50), visceral fat (-90) and soft
tissue (35) inside, bowel gas (-950), a vertebra (cancellous 250, cortex 700),
paraspinal muscles (55), the aorta (180), a liver (60), two kidneys (150) and
the target organ (90..130 HU, per case) in a bed of fat (``fat_bed_mm``,
like the retroperitoneal fat around the pancreas). A Gaussian point-spread function
(partial volume) and spatially correlated Gaussian noise (``noise_hu``) finish
the image.

**The label model.** The target organ is a random set with a known law. A
smooth latent field (mm, positive inside)::

    f(x) = a * (1 - rho(x)) + deform_mm * d(x)

where ``rho`` is the norm of a rotated, randomly sized ellipsoid (``rho = 1`` on
its surface), ``a`` its mean semi-axis and ``d`` a smooth unit-variance
Gaussian random field (correlation length ``deform_corr_mm``), fixed per case.
Annotator ``k`` draws an independent unit-variance Gaussian random field
``g_k`` with correlation ``exp(-r^2 / (2 l^2))`` (``l = noise_corr_mm``) and
labels ``m_k(x) = [f(x) + sigma * g_k(x) > 0]`` (``sigma = boundary_sigma_mm``).
Because ``g_k(x) ~ N(0, 1)`` at every voxel, the true per-voxel probability is
exactly::

    p*(x) = P(m_k(x) = 1) = Phi(f(x) / sigma)

with ``Phi`` the standard normal CDF. The image shows the organ with tissue
fraction ``p*`` (``HU = (1 - p*) HU_background + p* HU_organ``), so the best
possible segmenter predicts ``p*``; its boundary band (``|f| <~ 2 sigma``) is
genuine aleatoric ambiguity. About ``absent_fraction`` of the cases (at least
one when there are 5 or more) contain no organ: ``f = -inf``, ``p* = 0`` and
empty masks; prepare filters them out like the real data.

The Gaussian random fields are made by FFT: white noise convolved
(periodically) with a Gaussian kernel of standard deviation ``l / sqrt(2)``
voxels normalised to unit L2 norm, which makes every voxel exactly N(0, 1)
with correlation ``exp(-r^2 / (2 l^2))``.

**Layout on disk** (the TotalSegmentator layout, so the ordinary loader reads
it)::

    <root>/meta.csv                              study_type "phantom"
    <root>/phantom.json                          configuration + organ names written
    <root>/sXXXX/ct.nii.gz                       int16 HU
    <root>/sXXXX/segmentations/<organ>.nii.gz    annotator 0 (uint8 0/1)
    <root>/sXXXX/phantom/<organ>/annotator_<k>.nii.gz   annotators 1..K-1
    <root>/sXXXX/phantom/<organ>/p_true.nii.gz          p* (float32)

The phantom has one synthetic organ; preparing it under another organ name
copies the same masks under that name. Everything is deterministic in
``seed`` (case ``i`` uses the generator ``default_rng([seed, i])``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from filelock import FileLock
from scipy import ndimage, special

from mobseg import progress
from mobseg.data.meta import format_meta
from mobseg.data.nifti import array_to_image, atomic_write_json, verify_nifti_file
from mobseg.errors import ConfigurationError, InvalidInputError
from mobseg.fsutil import atomic_write_bytes, storage_error

log = logging.getLogger(__name__)

PHANTOM_VERSION = 1
CONFIG_NAME = "phantom.json"
SIDE_DIR = "phantom"
P_TRUE_NAME = "p_true.nii.gz"
#: SimpleITK direction of a RAS NIfTI file (as in TotalSegmentator).
RAS_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class PhantomConfig:
    """Parameters of the phantom (all lengths in mm).

    Attributes:
        num_cases: Number of cases.
        size: Edge length of the cubic volumes in voxels (>= 16).
        seed: Seed of everything.
        annotators: K, annotator masks per case (>= 1).
        fov_mm: Edge length of the field of view; spacing = fov_mm / size.
        absent_fraction: Share of cases without the organ.
        boundary_sigma_mm: sigma, scale of the annotators' boundary noise.
        noise_corr_mm: l, correlation length of the annotators' noise field.
        deform_mm: Amplitude of the smooth shape deformation.
        deform_corr_mm: Correlation length of the deformation.
        noise_hu: Standard deviation of the image noise (HU).
        fat_bed_mm: Thickness of the fat around the organ (latent f > -fat_bed_mm).
    """

    num_cases: int = 40
    size: int = 64
    seed: int = 0
    annotators: int = 3
    fov_mm: float = 320.0
    absent_fraction: float = 0.1
    boundary_sigma_mm: float = 3.0
    noise_corr_mm: float = 10.0
    deform_mm: float = 4.0
    deform_corr_mm: float = 30.0
    noise_hu: float = 12.0
    fat_bed_mm: float = 10.0

    def __post_init__(self) -> None:
        if self.num_cases < 1:
            raise ConfigurationError(f"--num-cases must be at least 1, not {self.num_cases}.")
        if self.size < 16:
            raise ConfigurationError(f"--size must be at least 16 voxels, not {self.size}.")
        if self.annotators < 1:
            raise ConfigurationError(f"--annotators must be at least 1, not {self.annotators}.")
        if not 0.0 <= self.absent_fraction < 1.0:
            raise ConfigurationError("absent_fraction must lie in [0, 1).")

    @property
    def spacing_mm(self) -> float:
        return self.fov_mm / self.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PhantomCase:
    """One generated case (arrays are (z, y, x) = (size, size, size)).

    Attributes:
        case: Case id (``s0000``...).
        ct: int16 HU.
        masks: (K, z, y, x) uint8 annotator masks.
        p_true: float32 true probability p* = Phi(f / sigma).
        latent: float32 latent field f (mm); -inf where there is no organ.
        present: Whether the case contains the organ.
        official_split: The split written to meta.csv.
    """

    case: str
    ct: np.ndarray
    masks: np.ndarray
    p_true: np.ndarray
    latent: np.ndarray
    present: bool
    official_split: str


def case_id(index: int) -> str:
    """``s0000``-style id of case ``index``."""
    return f"s{index:04d}"


def gaussian_random_field(
    shape: tuple[int, int, int], corr_vox: float, rng: np.random.Generator, n: int = 1
) -> np.ndarray:
    """``n`` independent stationary Gaussian random fields with unit variance.

    Periodic convolution of white noise with a Gaussian kernel of standard
    deviation ``corr_vox / sqrt(2)``, normalised to unit L2 norm, so each voxel
    is exactly N(0, 1) and the correlation at lag r is exp(-r^2 / (2 corr_vox^2)).

    Args:
        shape: (z, y, x) of each field.
        corr_vox: Correlation length l in voxels (> 0).
        rng: Random generator.
        n: Number of fields.

    Returns:
        float64 array of shape (n, *shape).
    """
    if corr_vox <= 0:
        raise ValueError(f"corr_vox must be positive, got {corr_vox}")
    s = corr_vox / np.sqrt(2.0)
    kernel = np.ones(shape)
    for axis, length in enumerate(shape):
        idx = np.arange(length)
        dist = np.minimum(idx, length - idx).astype(np.float64)
        k1 = np.exp(-0.5 * (dist / s) ** 2)
        view = [1, 1, 1]
        view[axis] = length
        kernel = kernel * k1.reshape(view)
    kernel /= np.sqrt((kernel**2).sum())
    kf = np.fft.rfftn(kernel)
    white = rng.standard_normal((n, *shape))
    return np.fft.irfftn(np.fft.rfftn(white, axes=(1, 2, 3)) * kf, s=shape, axes=(1, 2, 3))


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_norm(
    coords: np.ndarray, centre: np.ndarray, axes: np.ndarray, rot: np.ndarray
) -> np.ndarray:
    """rho(x) = |R^T (x - c) / a| for coords of shape (3, z, y, x) in mm."""
    d = coords - centre.reshape(3, 1, 1, 1)
    local = np.tensordot(rot.T, d, axes=1)
    return np.sqrt(((local / axes.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))


def generate_case(cfg: PhantomConfig, index: int) -> PhantomCase:
    """Generate case ``index`` of the phantom (deterministic in ``cfg.seed``).

    Returns:
        The case's CT, K annotator masks, p*, latent field and metadata.
    """
    rng = np.random.default_rng([cfg.seed, index])
    n = cfg.size
    shape = (n, n, n)
    h = cfg.spacing_mm
    half = cfg.fov_mm / 2.0
    # physical coordinates (mm) of voxel centres, (3, z, y, x) ordered as (z, y, x)
    axis_mm = (np.arange(n) + 0.5) * h - half
    zz, yy, xx = np.meshgrid(axis_mm, axis_mm, axis_mm, indexing="ij", sparse=True)
    u = 2.0 / cfg.fov_mm  # mm -> normalised [-1, 1]
    ux, uy, uz = xx * u, yy * u, zz * u

    n_absent = int(round(cfg.absent_fraction * cfg.num_cases))
    if cfg.absent_fraction > 0 and cfg.num_cases >= 5:
        n_absent = max(n_absent, 1)
    # absent cases are a deterministic, spread-out subset of the indices
    absent = set(np.random.default_rng([cfg.seed, 10**6]).permutation(cfg.num_cases)[:n_absent])
    present = index not in absent

    # --- anatomy (HU before partial volume) -------------------------------------
    sx, sy = 0.94 * (1 + 0.03 * rng.standard_normal()), 0.74 * (1 + 0.03 * rng.standard_normal())
    body_r = np.sqrt((ux / sx) ** 2 + (uy / sy) ** 2) * (1 + 0.03 * np.sin(np.pi * uz))
    body_r = np.broadcast_to(body_r, shape)
    hu = np.full(shape, -1000.0)
    hu[body_r < 1.0] = -100.0  # subcutaneous fat
    hu[body_r < 0.9] = 50.0  # abdominal wall
    interior = body_r < 0.84
    lowfreq = gaussian_random_field(shape, 20.0 / h, rng, n=2)
    visceral = np.where(lowfreq[0] > 0.4, -90.0, 35.0)
    hu[interior] = visceral[interior]
    gas = interior & (lowfreq[1] > 2.0)
    hu[gas] = -950.0

    def disc(cx: float, cy: float, r: float) -> np.ndarray:
        return np.broadcast_to(((ux - cx) ** 2 + (uy - cy) ** 2) < r**2, shape)

    for side in (-1.0, 1.0):
        hu[disc(side * 0.2, -0.58, 0.13)] = 55.0  # paraspinal muscles
    hu[disc(0.0, -0.5, 0.13)] = 700.0  # vertebral cortex
    hu[disc(0.0, -0.5, 0.1)] = 250.0  # cancellous bone
    hu[disc(0.06, -0.3, 0.05)] = 180.0  # aorta (arterial phase)
    coords = np.stack(np.broadcast_arrays(xx, yy, zz))  # (3, z, y, x) as (x, y, z) mm
    liver = _ellipsoid_norm(
        coords,
        np.array([-0.45, 0.0, 0.25]) * half,
        np.array([0.33, 0.35, 0.55]) * half * (1 + 0.05 * rng.standard_normal(3)),
        np.eye(3),
    )
    hu[liver < 1.0] = 60.0
    for side in (-1.0, 1.0):
        kidney = _ellipsoid_norm(
            coords,
            np.array([side * 0.33, -0.35, -0.1]) * half,
            np.array([0.1, 0.09, 0.22]) * half,
            np.eye(3),
        )
        hu[kidney < 1.0] = 150.0

    # --- the target organ ---------------------------------------------------------
    sigma = cfg.boundary_sigma_mm
    if present:
        centre = (
            np.array(
                [
                    0.18 + 0.06 * rng.standard_normal(),
                    0.05 + 0.06 * rng.standard_normal(),
                    0.1 * rng.standard_normal(),
                ]
            )
            * half
        )
        axes = rng.uniform(0.17, 0.27, size=3) * half
        rho = _ellipsoid_norm(coords, centre, axes, _rotation(rng))
        deform = gaussian_random_field(shape, cfg.deform_corr_mm / h, rng)[0]
        latent = float(axes.mean()) * (1.0 - rho) + cfg.deform_mm * deform
        # the organ sits in a bed of fat (like the pancreas), without gas or other soft tissue
        bed = (latent > -cfg.fat_bed_mm) & (hu < 100.0)
        hu[bed] = -90.0
        noise = gaussian_random_field(shape, cfg.noise_corr_mm / h, rng, n=cfg.annotators)
        masks = (latent[None] + sigma * noise > 0).astype(np.uint8)
        p_true = special.ndtr(latent / sigma)
        organ_hu = rng.uniform(90.0, 130.0)
        hu = (1.0 - p_true) * hu + p_true * organ_hu
    else:
        latent = np.full(shape, -np.inf)
        masks = np.zeros((cfg.annotators, *shape), dtype=np.uint8)
        p_true = np.zeros(shape)

    # --- partial volume and noise -------------------------------------------------
    hu = ndimage.gaussian_filter(hu, sigma=0.6, mode="nearest")
    noise_img = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=0.7, mode="wrap")
    noise_img *= cfg.noise_hu / max(float(noise_img.std()), 1e-12)
    ct = np.clip(np.rint(hu + noise_img), -1024, 3071).astype(np.int16)
    split = str(rng.choice(["train", "train", "train", "val", "test"]))
    return PhantomCase(
        case=case_id(index),
        ct=ct,
        masks=masks,
        p_true=p_true.astype(np.float32),
        latent=latent.astype(np.float32),
        present=present,
        official_split=split,
    )


def phantom_geometry(cfg: PhantomConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin) of the phantom grid (RAS file, SimpleITK LPS coordinates)."""
    h = cfg.spacing_mm
    half = cfg.fov_mm / 2.0
    # With direction diag(-1, -1, 1), index 0 lies at +half - h/2 in x and y.
    origin = (half - h / 2.0, half - h / 2.0, -half + h / 2.0)
    return (h, h, h), origin


def _image(array: np.ndarray, cfg: PhantomConfig) -> sitk.Image:
    spacing, origin = phantom_geometry(cfg)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(RAS_DIRECTION)
    return image


def verify_folder(tmp: Path, final: Path) -> None:
    """Read back every NIfTI file of a just-written case folder before it is renamed.

    SimpleITK's writer does not raise on a full disk; a short file is caught here.

    Raises:
        StorageError: a file does not verify (the folder is removed).
    """
    for path in sorted(tmp.rglob("*.nii.gz")):
        try:
            if path.stat().st_size == 0:
                raise InvalidInputError("The file is empty.", path=str(path))
            verify_nifti_file(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except (InvalidInputError, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            target = final / path.relative_to(tmp)
            reason = exc.message if isinstance(exc, InvalidInputError) else str(exc)
            raise storage_error(target, f"the written file does not read back ({reason})") from exc


def _write_case(root: Path, cfg: PhantomConfig, case: PhantomCase, organ: str) -> None:
    """Write one case into a hidden temporary folder, then rename it into place."""
    final = root / case.case
    tmp = root / f".tmp_{case.case}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "segmentations").mkdir(parents=True)
    side = tmp / SIDE_DIR / organ
    side.mkdir(parents=True)
    ct = _image(case.ct, cfg)
    sitk.WriteImage(ct, str(tmp / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(
        array_to_image(case.masks[0], ct), str(tmp / "segmentations" / f"{organ}.nii.gz"), True
    )
    for k in range(1, case.masks.shape[0]):
        sitk.WriteImage(
            array_to_image(case.masks[k], ct), str(side / f"annotator_{k}.nii.gz"), True
        )
    sitk.WriteImage(array_to_image(case.p_true, ct), str(side / P_TRUE_NAME), True)
    verify_folder(tmp, final)
    os.replace(tmp, final)


def _add_organ_name(root: Path, case: str, have: str, organ: str) -> None:
    """Copy the masks written as ``have`` under the name ``organ`` (atomic per file/folder)."""
    seg = root / case / "segmentations"
    target = seg / f"{organ}.nii.gz"
    if not target.exists():
        tmp = seg / f".{organ}.tmp.nii.gz"
        shutil.copyfile(seg / f"{have}.nii.gz", tmp)
        os.replace(tmp, target)
    side_target = root / case / SIDE_DIR / organ
    if not side_target.exists():
        tmp_dir = root / case / SIDE_DIR / f".tmp_{organ}"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        shutil.copytree(root / case / SIDE_DIR / have, tmp_dir)
        os.replace(tmp_dir, side_target)


def read_config(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The content of ``phantom.json`` (None when the folder holds no finished phantom)."""
    path = Path(root) / CONFIG_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def ensure_phantom(
    root: str | os.PathLike[str], organ: str, cfg: PhantomConfig, force: bool = False
) -> Path:
    """Make sure ``root`` holds the phantom of ``cfg`` with masks named ``organ``.

    Finished cases of an interrupted run are kept (each case folder appears
    atomically); a finished phantom with the same configuration is reused and,
    for a new organ name, only gets its masks copied under that name.

    Args:
        root: The phantom folder (``<workdir>/sources/phantom``).
        organ: Structure name the organ's masks are written as.
        cfg: The configuration.
        force: Regenerate when ``root`` holds a phantom of another configuration.

    Returns:
        ``root``.

    Raises:
        ConfigurationError: ``root`` holds a different phantom and ``force`` is False.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Several organs may be prepared at once (``mobseg study --jobs``): one at a time here.
    with FileLock(str(root.parent / f".{root.name}.lock")):
        return _ensure_phantom_locked(root, organ, cfg, force)


def _ensure_phantom_locked(root: Path, organ: str, cfg: PhantomConfig, force: bool) -> Path:
    wanted = {"version": PHANTOM_VERSION, **cfg.to_dict()}
    current = read_config(root)
    if current is not None and current.get("config") != wanted:
        if not force:
            changed = _diff(current["config"], wanted)
            raise ConfigurationError(
                f"{root} holds a phantom made with other settings ({changed}).",
                "Rerun with --force to regenerate it (organs prepared from it must then be "
                "prepared again), or use another --workdir.",
            )
        log.info("Regenerating the phantom in %s", root)
        shutil.rmtree(root)
        current = None
    elif current is None and root.exists():
        # Cases of an interrupted run are reused only if partial.json says they
        # were made with this configuration and organ name.
        partial = root / "partial.json"
        marker = json.loads(partial.read_text()) if partial.is_file() else None
        if marker != {"config": wanted, "organ": organ}:
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)

    if current is not None:
        organs: list[str] = list(current.get("organs", []))
        if organ not in organs:
            for i in range(cfg.num_cases):
                _add_organ_name(root, case_id(i), organs[0], organ)
            organs.append(organ)
            atomic_write_json(root / CONFIG_NAME, {**current, "organs": organs})
        return root

    atomic_write_json(root / "partial.json", {"config": wanted, "organ": organ})
    first_organ = organ
    rows: list[dict[str, str]] = []
    with progress.progress_bar("Generating the phantom", cfg.num_cases) as advance:
        for i in range(cfg.num_cases):
            cid = case_id(i)
            case = generate_case(cfg, i)
            if not (root / cid).exists():
                _write_case(root, cfg, case, first_organ)
            rows.append(
                {
                    "image_id": cid,
                    "age": "",
                    "gender": "",
                    "institute": "mobseg phantom",
                    "study_type": "phantom ",
                    "split": case.official_split,
                    "pathology": "" if case.present else "organ absent",
                }
            )
            advance()
    atomic_write_bytes(root / "meta.csv", format_meta(rows))
    atomic_write_json(
        root / CONFIG_NAME,
        {
            "config": wanted,
            "organs": [first_organ],
            "spacing_mm": cfg.spacing_mm,
            "absent_cases": [r["image_id"] for r in rows if r["pathology"]],
            "label_model": "m_k = [f + sigma * g_k > 0], p* = Phi(f / sigma)",
            "side_folder": f"sXXXX/{SIDE_DIR}/<organ>/annotator_<k>.nii.gz, {P_TRUE_NAME}",
        },
    )
    (root / "partial.json").unlink(missing_ok=True)
    return root


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys) or "unknown"


def annotator_paths(root: str | os.PathLike[str], organ: str, case: str) -> list[Path]:
    """All annotator masks of a phantom case, annotator 0 first (only existing files)."""
    root = Path(root)
    first = root / case / "segmentations" / f"{organ}.nii.gz"
    side = root / case / SIDE_DIR / organ
    rest = sorted(
        side.glob("annotator_*.nii.gz"),
        key=lambda p: int(p.name.removeprefix("annotator_").removesuffix(".nii.gz")),
    )
    return ([first] if first.exists() else []) + rest


def p_true_path(root: str | os.PathLike[str], organ: str, case: str) -> Path | None:
    """The p* file of a phantom case, or None when absent."""
    path = Path(root) / case / SIDE_DIR / organ / P_TRUE_NAME
    return path if path.is_file() else None
