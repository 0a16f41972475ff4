"""Cost of Monte-Carlo prediction (k = 30 and k = 100) relative to deterministic prediction.

One synthetic preprocessed volume is predicted with mobseg's
:class:`~mobseg.nnunet.predictor.MCPredictor` (sliding window, Gaussian
stitching of E[p], E[p^2], E[H]) on the same network for every method. Two
baselines are measured in the same run:

* ``nnU-Net logits``: nnU-Net's own ``predict_sliding_window_return_logits``
  with the plain backbone (what ``nnUNetv2_predict`` computes before export);
* ``deterministic``: mobseg's predictor with the deterministic head (one
  softmax per tile, zero variance); ratios are read against this one.

Timing runs all configurations in one process, interleaved round by round
(so a busy machine slows all of them alike; the fastest round of each, wall
clock and process CPU time). Peak resident memory (VmHWM after a warm-up) is
measured with each configuration in a process of its own. Target: mob at
k = 100 within 1.3x of deterministic prediction.

Usage::

    .venv/bin/python benchmarks/bench_predict.py                 # cpu plan, 64^3 volume
    .venv/bin/python benchmarks/bench_predict.py --features 32,64,128,256 --patch 64 --size 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

STOCHASTIC = ("diagonal", "lowrank", "single-basis", "mob")


def _configs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, method, k) of every measured configuration."""
    out = [("nnU-Net logits", "nnunet", 1), ("deterministic", "deterministic", 1)]
    for method in args.methods.split(","):
        for k in (30, 100):
            out.append((f"{method} k={k}", method, k))
    return out


def _setup(method: str, k: int, args: argparse.Namespace):
    """A predictor for (method, k) and the synthetic volume; returns a callable."""
    import torch

    from mobseg.core.config import HeadConfig
    from mobseg.nnunet.env import quiet
    from mobseg.nnunet.network import build_backbone, build_network
    from mobseg.nnunet.predictor import MCPredictor
    from mobseg.nnunet.synthetic import DATASET_JSON, managers, plans_dict

    features = tuple(int(f) for f in args.features.split(","))
    pm, cm = managers(plans_dict(features, args.patch))
    torch.manual_seed(0)
    volume = torch.randn(1, args.size, args.size, args.size)
    if method == "nnunet":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        net = build_backbone(pm, cm, 1, 2, False).eval()
        with quiet():
            pred = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=False,
                perform_everything_on_device=False,
                device=torch.device("cpu"),
                allow_tqdm=False,
            )
            pred.manual_initialization(net, pm, cm, None, DATASET_JSON, "nnUNetTrainer", None)

        def run() -> None:
            with quiet():
                pred.predict_sliding_window_return_logits(volume)

        return run
    head = HeadConfig(method, rank=args.rank, bases=args.bases, partitions=args.partitions)
    net = build_network(pm, cm, 1, 2, head, False).eval()
    pred = MCPredictor(samples=k, chunk=args.chunk, tile_step_size=0.5, device="cpu")
    pred.setup(net, pm, cm, DATASET_JSON, (0, 1, 2), point_mass=not head.stochastic)

    def run() -> None:
        pred.predict_moments(volume)

    return run


def _memory_worker(label: str, method: str, k: int, args: argparse.Namespace, queue) -> None:
    from benchlib import peak_mb, reset_peak

    from mobseg.nnunet.synthetic import nnunet_sandbox

    nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    run = _setup(method, k, args)
    run()
    ok = reset_peak()
    run()
    queue.put({"label": label, "peak_mb": peak_mb(), "reset": ok})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="edge of the cubic volume")
    ap.add_argument("--patch", type=int, default=32, help="edge of the cubic patch")
    ap.add_argument("--features", default="8,16,32,64", help="features per stage")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bases", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=None, help="samples drawn at once (default: auto)")
    ap.add_argument("--repeats", type=int, default=8, help="measured rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(STOCHASTIC))
    ap.add_argument("--skip-memory", action="store_true", help="time only")
    args = ap.parse_args()
    configs = _configs(args)

    ctx = mp.get_context("spawn")
    memory = {label: {"peak_mb": float("nan")} for label, _, _ in configs}
    for label, method, k in [] if args.skip_memory else configs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_worker, args=(label, method, k, args, queue))
        proc.start()
        memory[label] = queue.get()
        proc.join()

    from mobseg.nnunet.synthetic import nnunet_sandbox

    nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    runs = {label: _setup(method, k, args) for label, method, k in configs}
    for run in runs.values():
        run()  # warm-up
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)

    # the fastest round: the least disturbed by other work on a shared machine
    w = {label: min(v) for label, v in wall.items()}
    c = {label: min(v) for label, v in cpu.items()}
    base = "deterministic"
    print(
        f"prediction of a {args.size}^3 volume, patch {args.patch}^3, step 0.5, features "
        f"{args.features}, R = {args.rank}, M = {args.bases}, P = {args.partitions}, chunk "
        f"{args.chunk or 'auto'}, {args.threads} threads, CPU, {args.repeats} interleaved rounds"
    )
    print(f"{'configuration':<20}{'wall s':>9}{'x det':>8}{'cpu s':>9}{'x det':>8}{'peak MB':>10}")
    for label in runs:
        print(
            f"{label:<20}{w[label]:>9.3f}{w[label] / w[base]:>8.2f}"
            f"{c[label]:>9.3f}{c[label] / c[base]:>8.2f}{memory[label]['peak_mb']:>10.0f}"
        )
    if "mob k=100" in w:
        ratio = w["mob k=100"] / w[base]
        verdict = "meets" if ratio <= 1.3 else "misses"
        print(f"mob k=100 / deterministic = {ratio:.2f}x ({verdict} the 1.3x target)")


if __name__ == "__main__":
    main()
