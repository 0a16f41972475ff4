"""Cost of one fine-tuning step of each method, relative to the deterministic step.

Runs mobseg's real ``FinetuneTrainer.train_step`` (one backbone pass with
deep supervision, the head, k samples, ``StochasticSegLoss``, nnU-Net's Dice +
CE on the lower-resolution outputs, backward, gradient clipping, AdamW) on
the same network and the same synthetic patch for every method. Each method
runs in its own process for its peak resident memory (VmHWM, reset after a
warm-up step); the seconds per iteration are timed with all methods in one
process, interleaved round by round, and the fastest round of each counts.
The baseline is the ``deterministic`` fine-tuning step, the same trainer
without a stochastic head. Target: mob <= 1.15x at k = 5.

Usage::

    .venv/bin/python benchmarks/bench_train.py                      # 64^3 patch
    .venv/bin/python benchmarks/bench_train.py --patch 32 --features 8,16,32,64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

METHODS = ("deterministic", "diagonal", "lowrank", "single-basis", "mob")


def _trainer(method: str, args: argparse.Namespace, root) -> tuple:
    """A FinetuneTrainer for ``method`` on the synthetic plans, and a synthetic batch."""
    import torch

    from mobseg.core.config import HeadConfig, LossConfig
    from mobseg.nnunet.env import quiet
    from mobseg.nnunet.synthetic import DATASET_JSON, plans_dict
    from mobseg.nnunet.trainer import FinetuneTrainer, make_trainer

    features = tuple(int(f) for f in args.features.split(","))
    plans = plans_dict(features, args.patch)
    trainer = make_trainer(FinetuneTrainer, plans, "3d_fullres", DATASET_JSON, "cpu", False)
    head = HeadConfig(method, rank=args.rank, bases=args.bases, partitions=args.partitions)
    trainer.configure(
        head=head,
        loss=LossConfig(samples=args.k),
        run_dir=root / f"run-{method}",
        backbone_checkpoint=None,
        seed=0,
        epochs=1,
        iterations=1,
    )
    with quiet():
        trainer.initialize()
    trainer.network.train()
    # a sphere in the patch, and nnU-Net's deep-supervision targets (nearest downsampling)
    p = args.patch
    g = torch.stack(torch.meshgrid(*[torch.arange(p)] * 3, indexing="ij")).float()
    label = (((g - p / 2) ** 2).sum(0) < (p / 4) ** 2).float()[None, None]
    torch.manual_seed(0)
    data = torch.randn(1, 1, p, p, p) + 2 * label
    n_out = len(trainer.configuration_manager.pool_op_kernel_sizes) - 1
    targets = [label[..., :: 2**i, :: 2**i, :: 2**i].contiguous() for i in range(n_out)]
    return trainer, {"data": data, "target": targets}


def _memory_worker(method: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    """Peak resident memory of one step of ``method``, in a process of its own."""
    from benchlib import peak_mb, reset_peak

    from mobseg.nnunet.synthetic import nnunet_sandbox

    root = nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    trainer, batch = _trainer(method, args, root)
    trainer.train_step(batch)  # warm-up: allocator pools, oneDNN primitives
    reset_ok = reset_peak()
    trainer.train_step(batch)
    params = sum(x.numel() for x in trainer.network.parameters())
    queue.put({"method": method, "peak_mb": peak_mb(), "reset": reset_ok, "params": params})


def _timing(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Seconds per step, all methods in this process, interleaved round by round.

    Interleaving exposes every method to the same load of a shared machine;
    both wall-clock and process CPU time are reported (fastest round).
    """
    from mobseg.nnunet.synthetic import nnunet_sandbox

    root = nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    setups = {m: _trainer(m, args, root) for m in methods}
    for trainer, batch in setups.values():
        for _ in range(args.warmup):
            trainer.train_step(batch)
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, (trainer, batch) in setups.items():
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(batch)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    # the fastest round: the least disturbed by other work on a shared machine
    return {m: {"wall": min(wall[m]), "cpu": min(cpu[m])} for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch", type=int, default=64, help="cubic patch edge (voxels)")
    ap.add_argument("--features", default="32,64,128,256", help="features per stage")
    ap.add_argument("--k", type=int, default=5, help="samples per step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bases", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=6, help="measured rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = args.methods.split(",")
    if "deterministic" not in methods:
        methods.insert(0, "deterministic")

    ctx = mp.get_context("spawn")
    memory = {}
    for method in methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_worker, args=(method, args, queue))
        proc.start()
        memory[method] = queue.get()
        proc.join()
    times = _timing(methods, args)

    base_t, base_m = times["deterministic"], memory["deterministic"]
    print(
        f"fine-tuning step, patch {args.patch}^3, features {args.features}, batch 1, "
        f"k = {args.k}, R = {args.rank}, M = {args.bases}, P = {args.partitions}, "
        f"{args.threads} threads, CPU, {args.repeats} interleaved rounds; "
        f"{base_m['params'] / 1e6:.2f} M parameters (deterministic)"
    )
    print(
        f"{'method':<15}{'wall s':>9}{'x det':>8}{'cpu s':>9}{'x det':>8}"
        f"{'peak MB':>10}{'x det':>8}"
    )
    for m in methods:
        t, mem = times[m], memory[m]
        print(
            f"{m:<15}{t['wall']:>9.3f}{t['wall'] / base_t['wall']:>8.2f}"
            f"{t['cpu']:>9.3f}{t['cpu'] / base_t['cpu']:>8.2f}"
            f"{mem['peak_mb']:>10.0f}{mem['peak_mb'] / base_m['peak_mb']:>8.2f}"
        )
    if "mob" in times:
        ratio = times["mob"]["wall"] / base_t["wall"]
        verdict = "meets" if ratio <= 1.15 else "misses"
        print(f"mob / deterministic = {ratio:.2f}x per iteration ({verdict} the 1.15x target)")


if __name__ == "__main__":
    main()
