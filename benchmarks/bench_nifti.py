"""Verified NIfTI reading of the example CT against SimpleITK's plain read.

``mobseg.data.nifti.read_image`` first verifies the file (nibabel reads the
header and the whole data block, gzip checks the stream's CRC and length,
float data are counted for NaN) and then reads it with SimpleITK. The baseline
is ``SimpleITK.ReadImage`` alone, which checks none of this. Calls alternate
between the two, and each figure is the best of ``--repeats`` calls (CPU time
of this process), so the ratio does not depend much on how busy the machine is.

Usage::

    .venv/bin/python benchmarks/bench_nifti.py            # ../shared/data/totalseg_example
    .venv/bin/python benchmarks/bench_nifti.py --path ct.nii.gz --repeats 50
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk

from mobseg.data import nifti

EXAMPLE = Path(__file__).resolve().parents[1] / "../shared/data/totalseg_example/s0000/ct.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=EXAMPLE.resolve())
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not args.path.is_file():
        raise SystemExit(f"{args.path} does not exist (give --path).")
    path = str(args.path)
    calls: dict[str, Callable[[], object]] = {
        "SimpleITK.ReadImage": lambda: sitk.ReadImage(path),
        "verify_nifti_file": lambda: nifti.verify_nifti_file(path),
        "read_image (verify + read)": lambda: nifti.read_image(path),
    }
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.process_time()
            call()
            best[name] = min(best[name], time.process_time() - start)
    base = best["SimpleITK.ReadImage"]
    print(f"{args.path.name}: {sitk.ReadImage(path).GetSize()} voxels, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:28s} {seconds * 1e3:8.2f} ms  {seconds / base:5.2f} x SimpleITK")


if __name__ == "__main__":
    main()
