"""Cost of sampling + loss (forward and backward) per method, relative to deterministic.

For a batch of B patches of size S^3 with C classes, each method's
distribution parameters (what its head outputs: mu, D, the factor or the
coefficients, the bases and the weights) are leaf tensors; one measured step
builds the distribution, draws k samples, computes StochasticSegLoss and runs
backward. Each configuration runs in its own process so that its peak memory
(the kernel's high-water mark of resident memory, reset after the inputs are
allocated and a warm-up step has run) is not polluted by the others.

Two baselines are measured in the same run:

* ``deterministic``: the loss of the deterministic method, which computes
  CE + Dice once (its k samples are identical): nnU-Net's own loss.
* ``deterministic x k``: the same loss evaluated on k identical samples, i.e.
  the Monte-Carlo CE + Dice without any sampling. The target "mob <= 1.5x"
  is read against this one: it isolates what sampling the structured noise adds.

Usage::

    .venv/bin/python benchmarks/bench_core.py            # 2 x 2 x 128^3, k = 5
    .venv/bin/python benchmarks/bench_core.py --size 64 --repeats 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import time
from pathlib import Path

CONFIGS: list[tuple[str, dict]] = [
    ("deterministic", {"method": "deterministic"}),
    ("deterministic x k", {"method": "deterministic"}),
    ("diagonal", {"method": "diagonal"}),
    ("lowrank", {"method": "lowrank"}),
    ("single-basis", {"method": "single-basis"}),
    ("single-basis block", {"method": "single-basis", "noise": "block"}),
    ("single-basis global", {"method": "single-basis", "noise": "global"}),
    ("mob", {"method": "mob"}),
    ("mob hard", {"method": "mob", "mixing": "hard"}),
    ("mob block", {"method": "mob", "noise": "block"}),
    ("mob factor sampler", {"method": "mob", "sampler": "factor"}),
]


def _mem_mb() -> tuple[float, float]:
    """(peak, current) resident memory of this process in MB."""
    text = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024
    return hwm, rss


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _worker(label: str, kwargs: dict, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    from mobseg.core.config import HeadConfig, LossConfig
    from mobseg.core.distributions import (
        DeterministicLogits,
        DiagonalLogits,
        LowRankLogits,
        MixtureOfBasesLogits,
        SingleBasisLogits,
    )
    from mobseg.core.losses import StochasticSegLoss

    class KIdentical(DeterministicLogits):
        """Deterministic logits pushed through the k-sample loss."""

        is_deterministic = False

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = HeadConfig(**kwargs)
    b, c, s, k = args.batch, args.classes, args.size, args.samples
    sp = (s, s, s)
    r, m, p = cfg.rank, cfg.bases, cfg.partitions

    def leaf(*shape: int, scale: float = 1.0, positive: bool = False) -> torch.Tensor:
        t = torch.randn(*shape) * scale
        if positive:
            t = t.abs() + 1e-3
        return t.requires_grad_()

    mu = leaf(b, c, *sp, scale=3.0)
    target = (torch.rand(b, 1, *sp) > 0.7).float()
    params: dict[str, torch.Tensor] = {}
    if cfg.method != "deterministic":
        params["var"] = leaf(b, c, *sp, scale=0.1, positive=True)
    if cfg.method == "lowrank":
        params["factor"] = leaf(b, c, r, *sp, scale=0.1)
    if cfg.method in ("single-basis", "mob"):
        params["coeffs"] = leaf(b, r, *sp, scale=0.1)
    if cfg.method == "single-basis":
        params["basis"] = leaf(c, r)
    if cfg.method == "mob":
        params["bases"] = leaf(m, c, r)
        params["wlogits"] = leaf(b, p**3, m)

    def build():
        if label == "deterministic x k":
            return KIdentical(mu)
        if cfg.method == "deterministic":
            return DeterministicLogits(mu)
        if cfg.method == "diagonal":
            return DiagonalLogits(mu, params["var"])
        if cfg.method == "lowrank":
            return LowRankLogits(mu, params["var"], params["factor"])
        if cfg.method == "single-basis":
            return SingleBasisLogits(
                mu, params["var"], params["coeffs"], params["basis"], cfg.noise, p, cfg.sampler
            )
        w = torch.softmax(params["wlogits"] / cfg.temperature, -1)
        return MixtureOfBasesLogits(
            mu, params["var"], params["coeffs"], params["bases"], w, p, cfg.mixing, cfg.noise,
            cfg.sampler,
        )  # fmt: skip

    loss = StochasticSegLoss(LossConfig(samples=k))

    def step() -> None:
        terms = loss(build(), target)
        terms.total.backward()
        for t in (mu, *params.values()):
            t.grad = None

    step()  # warm-up (allocator, caches)
    ok = _reset_peak()
    _, base = _mem_mb()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak, _ = _mem_mb()
    queue.put((label, min(times), peak - base if ok else float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128, help="patch edge S (S^3 voxels)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--samples", type=int, default=5, help="k")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps (the fastest is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="labels to run (default all)")
    args = ap.parse_args()

    ctx = mp.get_context("spawn")
    results: dict[str, tuple[float, float]] = {}
    for label, kwargs in CONFIGS:
        if args.only and label not in args.only and not label.startswith("deterministic"):
            continue
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(label, kwargs, args, q))
        proc.start()
        name, sec, mem = q.get()
        proc.join()
        results[name] = (sec, mem)
        print(f"  measured {name:<22} {sec:7.3f} s {mem:8.0f} MB", flush=True)

    t1, m1 = results["deterministic"]
    tk, mk = results["deterministic x k"]
    print()
    print(
        f"sampling + loss, forward + backward: B={args.batch}, C={args.classes}, "
        f"{args.size}^3, k={args.samples}, {args.threads} threads, fastest of {args.repeats}"
    )
    head = f"{'method':<22} {'time s':>8} {'peak MB':>8} {'t/det':>7} {'m/det':>7}"
    print(head + f" {'t/det x k':>10} {'m/det x k':>10}")
    for name, (sec, mem) in results.items():
        print(
            f"{name:<22} {sec:8.3f} {mem:8.0f} {sec / t1:7.2f} {mem / m1:7.2f} "
            f"{sec / tk:10.2f} {mem / mk:10.2f}"
        )
    if "mob" in results:
        sec, mem = results["mob"]
        verdict = "meets" if sec / tk <= 1.5 and mem / mk <= 1.5 else "misses"
        print(
            f"\nmob vs deterministic x k: time {sec / tk:.2f}x, memory {mem / mk:.2f}x "
            f"-> {verdict} the 1.5x target; vs the one-pass deterministic loss: "
            f"time {sec / t1:.2f}x, memory {mem / m1:.2f}x."
        )


if __name__ == "__main__":
    main()
