"""All metrics of one 512 x 512 x 300 case: mobseg's streamed evaluation against a reference.

The case (about 79 M voxels) is synthetic but shaped like a real one: an
organ of ~0.1 % of the volume, a foreground probability that is exactly 0 far
away, a soft boundary, a false-positive blob, Var[p] and the entropy as float32
maps. The same arrays are generated (deterministically) in two processes:

* ``reference``: torchmetrics' ``BinaryCalibrationError(n_bins=15)`` with
  ``norm="l1"`` (ECE) and ``norm="max"`` (MCE), plus a MONAI-style Dice
  (``AsDiscrete(argmax=True, to_onehot=2)`` on the stacked class
  probabilities and on the label, then ``DiceMetric(include_background=False)``
  arithmetic), all in torch on the whole volume at once;
* ``mobseg``: :func:`mobseg.metrics.evaluate_case` with the variance and
  entropy maps: Dice, NLL, Brier, ECE, MCE, reliability bins, error-detection
  AUROC/AUPRC for both scores, mean uncertainty over the prediction, all
  streamed in chunks of 2 Mi voxels.

Each runs in its own process; its peak memory is the kernel's high-water mark
of resident memory, reset after the inputs exist, minus the resident memory
at that moment (so only what the metrics allocate counts). Time is the best
of ``--repeats`` runs after a warm-up on a small array. Targets: mobseg
faster than the reference, and at most a quarter of its peak memory.

Usage::

    .venv/bin/python benchmarks/bench_metrics.py                 # 300 x 512 x 512
    .venv/bin/python benchmarks/bench_metrics.py --shape 60 256 256 --repeats 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np
from benchlib import memory_mb, reset_peak


def make_case(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """prob, var, entropy (float32) and gt (uint8) of a synthetic case, built slab by slab."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    prob = np.empty(shape, np.float32)
    var = np.empty(shape, np.float32)
    ent = np.empty(shape, np.float32)
    gt = np.empty(shape, np.uint8)
    cz, cy, cx = nz * 0.5, ny * 0.55, nx * 0.45
    rz, ry, rx = nz * 0.08, ny * 0.06, nx * 0.09  # ~0.1 % of the volume
    y = (np.arange(ny, dtype=np.float32)[:, None] - cy) / ry
    x = (np.arange(nx, dtype=np.float32)[None, :] - cx) / rx
    fy, fx = (
        (np.arange(ny, dtype=np.float32)[:, None] - ny * 0.3) / 8,
        (np.arange(nx, dtype=np.float32)[None, :] - nx * 0.7) / 8,
    )
    for z in range(nz):
        zz = (z - cz) / rz
        d = (np.sqrt(zz * zz + y * y + x * x) - 1.0) * 12.0  # ~ voxels from the surface
        blob = (np.sqrt(((z - nz * 0.4) / 6) ** 2 + fy * fy + fx * fx) - 1.0) * 6.0
        noise = rng.normal(0.0, 1.0, (ny, nx)).astype(np.float32)
        gt[z] = (d + 0.8 * noise) < 0
        logit = np.maximum(-(d + 0.5) * 0.9, -(blob + 2.0) * 0.8) + 0.3 * noise
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -80, 80)))
        p[p < 1e-30] = 0.0
        prob[z] = p
        var[z] = p * (1 - p) * (0.2 + 0.05 * np.abs(noise))
        q = np.clip(p, 1e-12, 1 - 1e-12)
        ent[z] = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return {"prob": prob, "var": var, "entropy": ent, "gt": gt}


def reference_metrics(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """torchmetrics ECE and MCE plus MONAI-style Dice, whole volume in torch."""
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    p = torch.from_numpy(prob)
    t = torch.from_numpy(gt)
    out = {}
    for norm, name in (("l1", "ece"), ("max", "mce")):
        metric = BinaryCalibrationError(n_bins=15, norm=norm)
        metric.update(p, t)
        out[name] = float(metric.compute())
    # MONAI style: AsDiscrete(argmax=True, to_onehot=2) on (C, ...) probabilities and
    # on the label, then DiceMetric(include_background=False) on (B, C, ...) one-hots.
    probs = torch.stack([1 - p, p])[None]  # (1, 2, D, H, W)
    pred = probs.argmax(dim=1, keepdim=True)
    y_pred = torch.zeros_like(probs).scatter_(1, pred, 1.0)
    y = torch.zeros_like(probs).scatter_(1, t[None, None].long(), 1.0)
    dims = tuple(range(2, y.ndim))
    inter = (y_pred * y).sum(dim=dims)
    denom = y_pred.sum(dim=dims) + y.sum(dim=dims)
    out["dice"] = float((2 * inter / denom)[0, 1])
    return out


def reference_ece64(prob: np.ndarray, gt: np.ndarray) -> float:
    """torchmetrics' ECE on float64 probabilities (its bin sums are then exact)."""
    import torch
    from torchmetrics.classification import BinaryCalibrationError

    metric = BinaryCalibrationError(n_bins=15, norm="l1")
    metric.update(torch.from_numpy(prob.astype(np.float64)), torch.from_numpy(gt))
    return float(metric.compute())


def mobseg_metrics(case: dict[str, np.ndarray]) -> dict[str, float]:
    from mobseg.metrics import evaluate_case

    res = evaluate_case(
        case["prob"], case["gt"], variance=case["var"], entropy=case["entropy"], case="bench"
    )
    return {k: v for k, v in res.row.items() if isinstance(v, (int, float))}


def _worker(label: str, shape: tuple[int, int, int], repeats: int, queue: Any) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    small = make_case((4, 32, 32), seed=1)  # warm-up: imports, lazy init
    if label == "reference":
        reference_metrics(small["prob"], small["gt"])
    else:
        mobseg_metrics(small)
    case = make_case(shape)
    times, peaks, values = [], [], {}
    for _ in range(repeats):
        resettable = reset_peak()
        _, base = memory_mb()
        t0 = time.perf_counter()
        if label == "reference":
            values = reference_metrics(case["prob"], case["gt"])
        else:
            values = mobseg_metrics(case)
        times.append(time.perf_counter() - t0)
        peak, _ = memory_mb()
        peaks.append(peak - base if resettable else float("nan"))
    if label == "reference":  # untimed: torchmetrics again on float64 probabilities
        values["ece_float64"] = reference_ece64(case["prob"], case["gt"])
    queue.put(
        {
            "label": label,
            "time": min(times),
            "peak_mb": min(peaks),
            "values": values,
            "inputs_mb": sum(a.nbytes for a in case.values()) / 2**20,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X")
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shape = tuple(args.shape)
    ctx = mp.get_context("spawn")
    results = {}
    for label in ("reference", "mobseg"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(label, shape, args.repeats, queue))
        proc.start()
        results[label] = queue.get()
        proc.join()
    ref, ours = results["reference"], results["mobseg"]
    n = int(np.prod(shape))
    print(
        f"case {shape[0]} x {shape[1]} x {shape[2]} = {n / 1e6:.1f} M voxels; "
        f"inputs {ours['inputs_mb']:.0f} MB (prob, var, entropy float32; gt uint8)"
    )
    print(f"{'':<11}{'time (s)':>10}{'peak extra (MB)':>17}  metrics")
    print(
        f"{'reference':<11}{ref['time']:>10.2f}{ref['peak_mb']:>17.0f}  "
        "ECE, MCE (torchmetrics), Dice (MONAI style)"
    )
    print(
        f"{'mobseg':<11}{ours['time']:>10.2f}{ours['peak_mb']:>17.0f}  "
        "Dice, NLL, Brier, ECE, MCE, reliability, AUROC/AUPRC x 2 scores, mean uncertainty"
    )
    t_ratio = ours["time"] / ref["time"]
    m_ratio = ours["peak_mb"] / ref["peak_mb"]
    print(
        f"ratio mobseg/reference: time {t_ratio:.2f} (target < 1), "
        f"peak memory {m_ratio:.3f} (target <= 0.25)"
    )
    rv, ov = ref["values"], ours["values"]
    print("values   reference      mobseg")
    for k in ("ece", "mce", "dice"):
        print(f"{k:<8} {rv[k]:>10.6f} {ov[k]:>11.6f}")
    print(
        f"ece of torchmetrics on float64 input (untimed): {rv['ece_float64']:.6f}; on float32 "
        "its per-bin sums stop counting past 2^24 voxels, so it drifts on whole CT volumes"
    )
    print(
        f"mobseg also: NLL {ov['nll']:.5f}, Brier {ov['brier']:.6f}, "
        f"AUROC(var) {ov['auroc_var']:.4f}, AUPRC(var) {ov['auprc_var']:.4f}"
    )
    ok = t_ratio < 1 and m_ratio <= 0.25
    print("targets met" if ok else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
