"""Cost of sampling + loss (forward and backward) per method, relative to deterministic.

For a batch of B patches of size S^3 with C classes, each method's
distribution parameters (what its head outputs: mu, D, the factor or the
coefficients, the bases and the weights) are leaf tensors; one measured step
builds the distribution, draws k samples, computes StochasticSegLoss and runs
backward. Each configuration runs in its own process so that its peak memory
(the kernel's high-water mark of resident memory, reset after the inputs are
allocated and a warm-up step has run) is not polluted by the others. Both
wall-clock and CPU time (of the process, all threads) are reported: on a
shared machine CPU time is the steadier of the two.

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
import os
import time

from benchlib import memory_mb, reset_peak

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
    ok = reset_peak()
    _, base = memory_mb()
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak, _ = memory_mb()
    queue.put((label, min(wall), min(cpu), peak - base if ok else float("nan")))


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
    results: dict[str, tuple[float, float, float]] = {}
    for label, kwargs in CONFIGS:
        if args.only and label not in args.only and not label.startswith("deterministic"):
            continue
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(label, kwargs, args, q))
        proc.start()
        name, wall, cpu, mem = q.get()
        proc.join()
        results[name] = (wall, cpu, mem)
        print(
            f"  measured {name:<22} wall {wall:7.3f} s  cpu {cpu:7.3f} s  {mem:7.0f} MB", flush=True
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(
        f"sampling + loss, forward + backward: B={args.batch}, C={args.classes}, "
        f"{args.size}^3, k={args.samples}, {args.threads} threads, fastest of {args.repeats}, "
        f"load average {load:.1f}"
    )
    print("ratios to deterministic (one pass) | to deterministic x k (k identical samples)")
    print(
        f"{'method':<22} {'wall s':>7} {'cpu s':>7} {'peak MB':>8} | "
        f"{'wall':>5} {'cpu':>5} {'mem':>5} | {'wall':>5} {'cpu':>5} {'mem':>5}"
    )
    w1, c1, m1 = results["deterministic"]
    wk, ck, mk = results["deterministic x k"]
    for name, (w, c, m) in results.items():
        print(
            f"{name:<22} {w:7.3f} {c:7.3f} {m:8.0f} | {w / w1:5.2f} {c / c1:5.2f} {m / m1:5.2f} | "
            f"{w / wk:5.2f} {c / ck:5.2f} {m / mk:5.2f}"
        )
    if "mob" in results:
        w, c, m = results["mob"]
        ok = c / ck <= 1.5 and m / mk <= 1.5
        print(
            f"\nmob vs deterministic x k: cpu time {c / ck:.2f}x, wall {w / wk:.2f}x, peak memory "
            f"{m / mk:.2f}x -> {'meets' if ok else 'misses'} the 1.5x target "
            f"(vs the one-pass deterministic loss: cpu {c / c1:.2f}x, memory {m / m1:.2f}x)."
        )


if __name__ == "__main__":
    main()
