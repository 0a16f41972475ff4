"""The working directory: where every stage reads and writes.

One :class:`Workspace` names every path mobseg uses, so no stage invents its
own layout. Nothing is ever written outside ``root``.

Layout::

    <root>/
      manifest.json            the chain between stages (mobseg.manifest)
      downloads/               Zenodo archives (resumable)
      sources/phantom/         the synthetic phantom, TotalSegmentator layout
      data/<organ>/            splits.json, cases.csv (inclusion/exclusion)
      nnunet/raw|preprocessed|results/   nnU-Net's three folders
      runs/<organ>/<tag>/seed<S>/        fine-tuning (checkpoints, logs)
      predictions/<organ>/<tag>/seed<S>/ prediction files (SPEC section 7)
      evaluation/<organ>/<tag>/seed<S>/  metrics.csv
      report/                  tables, figures, report.md, report.html
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mobseg.errors import ConfigurationError, StorageError

DEFAULT_WORKDIR = "mobseg_work"
WORKDIR_ENV = "MOBSEG_WORKDIR"
NNUNET_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class Workspace:
    """Paths of one mobseg working directory.

    Args:
        root: The working directory (created on demand).
    """

    root: Path

    @classmethod
    def from_option(cls, workdir: str | os.PathLike[str] | None) -> Workspace:
        """Resolve ``--workdir``, then ``$MOBSEG_WORKDIR``, then ``./mobseg_work``.

        Raises:
            ConfigurationError: the path is a file or lies below one.
        """
        chosen = workdir or os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR
        root = Path(chosen).expanduser().resolve()
        for folder in (root, *root.parents):
            if folder.exists():
                if not folder.is_dir():
                    where = "is a file" if folder == root else f"lies below the file {folder}"
                    raise ConfigurationError(
                        f"The working directory {root} {where}.",
                        "Give --workdir a folder (it is created if missing).",
                    )
                break
        return cls(root)

    def ensure(self) -> Workspace:
        """Create the root folder if needed and return self.

        Raises:
            StorageError: the folder cannot be created (read-only disk, no permission).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"The working directory {self.root} cannot be created ({exc.strerror or exc}).",
                "Choose another --workdir.",
            ) from exc
        return self

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    def data_dir(self, organ: str) -> Path:
        return self.root / "data" / organ

    @property
    def nnunet_raw(self) -> Path:
        return self.root / "nnunet" / "raw"

    @property
    def nnunet_preprocessed(self) -> Path:
        return self.root / "nnunet" / "preprocessed"

    @property
    def nnunet_results(self) -> Path:
        return self.root / "nnunet" / "results"

    def run_dir(self, organ: str, tag: str, seed: int) -> Path:
        return self.root / "runs" / organ / tag / f"seed{seed}"

    def prediction_dir(self, organ: str, tag: str, seed: int) -> Path:
        return self.root / "predictions" / organ / tag / f"seed{seed}"

    def evaluation_dir(self, organ: str, tag: str, seed: int) -> Path:
        return self.root / "evaluation" / organ / tag / f"seed{seed}"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def configure_nnunet_env(self) -> dict[str, str]:
        """Point nnU-Net's environment variables into this workspace.

        Variables the user already set are kept. ``nnUNet_def_n_proc`` defaults
        to the number of cores. Must run before ``nnunetv2`` is imported,
        because nnU-Net reads them at import time.

        Returns:
            The values now in force, by variable name.
        """
        defaults = {
            "nnUNet_raw": self.nnunet_raw,
            "nnUNet_preprocessed": self.nnunet_preprocessed,
            "nnUNet_results": self.nnunet_results,
        }
        for name, path in defaults.items():
            if not os.environ.get(name):
                path.mkdir(parents=True, exist_ok=True)
                os.environ[name] = str(path)
        os.environ.setdefault("nnUNet_def_n_proc", str(os.cpu_count() or 1))
        names = (*NNUNET_ENV, "nnUNet_def_n_proc")
        return {n: os.environ[n] for n in names}
