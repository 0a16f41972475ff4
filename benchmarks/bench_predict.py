"""Cost of uncertainty prediction relative to deterministic prediction and to nnU-Net's own.

One synthetic preprocessed volume is predicted on the same network by:

* ``nnU-Net``: nnU-Net's own ``nnUNetPredictor`` with the plain backbone:
  ``predict_sliding_window_return_logits`` (no TTA) and the softmax of the
  logits, i.e. the probabilities ``nnUNetv2_predict`` exports;
* ``deterministic``: mobseg's :class:`~mobseg.nnunet.predictor.HeadPredictor`
  with the deterministic head, then the maps (E[p], Var[p], entropy, MI) of
  :func:`~mobseg.core.inference.voxel_maps` on the same grid;
* every stochastic method with two classes, the same way (the maps are exact,
  by quadrature: no sample count).

TTA is off for all of them. Timing runs all configurations in one process,
interleaved round by round (so a busy machine slows all of them alike): the
seconds are each configuration's fastest round (wall clock and process CPU
time), the ratios the median over rounds of the ratio within a round; each
round starts one configuration later than the one before. Peak resident memory
(VmHWM after a warm-up) is measured with each configuration in a process of
its own. Targets (issue 11): every stochastic method <= 1.10x deterministic
and <= 1.25x nnU-Net in time, <= 1.2x nnU-Net in peak memory.

Usage::

    .venv/bin/python benchmarks/bench_predict.py                 # cpu plan, 64^3 volume
    .venv/bin/python benchmarks/bench_predict.py --features 32,64,128,256 --patch 64 --size 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

STOCHASTIC = ("diagonal", "lowrank", "single-basis", "mob")


def _configs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, method) of every measured configuration."""
    return [("nnU-Net", "nnunet"), ("deterministic", "deterministic")] + [
        (m, m) for m in args.methods.split(",")
    ]


def _setup(method: str, args: argparse.Namespace):
    """A predictor for ``method`` and the synthetic volume; returns a callable."""
    import torch

    from mobseg.core.config import HeadConfig
    from mobseg.core.inference import voxel_maps
    from mobseg.nnunet.env import quiet
    from mobseg.nnunet.network import build_backbone, build_network
    from mobseg.nnunet.predictor import HeadPredictor
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
                logits = pred.predict_sliding_window_return_logits(volume)
            torch.softmax(logits.float(), 0)

        return run
    head = HeadConfig(method, rank=args.rank, bases=args.bases, partitions=args.partitions)
    net = build_network(pm, cm, 1, 2, head, False).eval()
    if args.variance_bias is not None:  # a head that has learned a wide distribution
        for name, param in net.named_parameters():
            if name.startswith("head.variance") and name.endswith("bias"):
                param.data.fill_(args.variance_bias)
    pred = HeadPredictor(tile_step_size=0.5, use_mirroring=False, device="cpu")
    pred.setup(net, pm, cm, DATASET_JSON, (0, 1, 2), point_mass=not head.stochastic)

    def run() -> None:
        voxel_maps(pred.predict_parameters(volume), 2)

    return run


def _median_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of times[i] / base[i]."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    n = len(ratios)
    return ratios[n // 2] if n % 2 else 0.5 * (ratios[n // 2 - 1] + ratios[n // 2])


def _memory_worker(label: str, method: str, args: argparse.Namespace, queue) -> None:
    from benchlib import peak_mb, reset_peak

    from mobseg.nnunet.synthetic import nnunet_sandbox

    nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    run = _setup(method, args)
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
    ap.add_argument("--repeats", type=int, default=8, help="measured rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(STOCHASTIC))
    ap.add_argument(
        "--variance-bias",
        type=float,
        default=None,
        help="set the variance heads' bias (e.g. 1.5: var(d) ~ 4, the wide quadrature); "
        "default: the heads at initialisation (var(d) ~ 2e-3)",
    )
    ap.add_argument("--skip-memory", action="store_true", help="time only")
    args = ap.parse_args()
    configs = _configs(args)

    ctx = mp.get_context("spawn")
    memory = {label: {"peak_mb": float("nan")} for label, _ in configs}
    for label, method in [] if args.skip_memory else configs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_worker, args=(label, method, args, queue))
        proc.start()
        memory[label] = queue.get()
        proc.join()

    from mobseg.nnunet.synthetic import nnunet_sandbox

    nnunet_sandbox()
    import torch

    torch.set_num_threads(args.threads)
    runs = {label: _setup(method, args) for label, method in configs}
    for run in runs.values():
        run()  # warm-up
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    order = list(runs.items())
    for i in range(args.repeats):
        # each round starts one configuration later: no configuration always follows the same
        # one (the one before leaves the allocator and caches in its own state)
        for label, run in order[i % len(order) :] + order[: i % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)

    # the fastest round: the least disturbed by other work on a shared machine
    w = {label: min(v) for label, v in wall.items()}
    c = {label: min(v) for label, v in cpu.items()}
    base, ref = "deterministic", "nnU-Net"
    # ratios: the median over rounds of the ratio within each round (configurations of one
    # round run back to back, so a slow phase of the machine slows both sides alike)
    ratio_det = {label: _median_ratio(wall[label], wall[base]) for label in runs}
    ratio_ref = {label: _median_ratio(wall[label], wall[ref]) for label in runs}
    cratio_det = {label: _median_ratio(cpu[label], cpu[base]) for label in runs}
    print(
        f"prediction of a {args.size}^3 volume, patch {args.patch}^3, step 0.5, no TTA, features "
        f"{args.features}, R = {args.rank}, M = {args.bases}, P = {args.partitions}, "
        f"{args.threads} threads, CPU, {args.repeats} interleaved rounds, variance bias "
        f"{'initial' if args.variance_bias is None else args.variance_bias}"
    )
    print(
        f"{'configuration':<16}{'wall s':>9}{'x det':>8}{'x nnU':>8}{'cpu s':>9}{'x det':>8}"
        f"{'peak MB':>10}{'x nnU':>8}"
    )
    for label in runs:
        print(
            f"{label:<16}{w[label]:>9.3f}{ratio_det[label]:>8.2f}{ratio_ref[label]:>8.2f}"
            f"{c[label]:>9.3f}{cratio_det[label]:>8.2f}{memory[label]['peak_mb']:>10.0f}"
            f"{memory[label]['peak_mb'] / memory[ref]['peak_mb']:>8.2f}"
        )
    stochastic = [label for label in runs if label not in (base, ref)]
    worst_det = max(ratio_det[m] for m in stochastic)
    worst_ref = max(ratio_ref[m] for m in stochastic)
    worst_mem = max(memory[m]["peak_mb"] / memory[ref]["peak_mb"] for m in stochastic)
    print(
        f"worst stochastic method: {worst_det:.2f}x deterministic (target 1.10), "
        f"{worst_ref:.2f}x nnU-Net (target 1.25), memory {worst_mem:.2f}x nnU-Net (target 1.2)"
    )


if __name__ == "__main__":
    main()
