"""Time of :func:`mobseg.metrics.evaluate_case` on one 120 x 256 x 256 case, with and without p*.

Run it with this checkout and with another one (e.g. main) on the same machine
to compare; the argument ``pstar`` adds the metrics against the true
probability (phantom only)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_truth_metrics.py branch
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_truth_metrics.py branch pstar
"""

import sys
import time

import numpy as np

from mobseg.metrics import evaluate_case

rng = np.random.default_rng(0)
shape = (120, 256, 256)
z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
r = np.sqrt(z**2 + y**2 + x**2)
pstar = (1 / (1 + np.exp((r - 0.3) * 40))).astype(np.float32)
t = (rng.random(shape, dtype=np.float32) < pstar).astype(np.uint8)
p = np.clip(pstar + rng.normal(0, 0.02, shape).astype(np.float32), 0, 1).astype(np.float32)
v = (p * (1 - p) * 0.2).astype(np.float32)
kw = {"true_prob": pstar} if "pstar" in sys.argv else {}
best = []
for _ in range(3):
    t0 = time.perf_counter()
    evaluate_case(p, t, variance=v, **kw)
    best.append(time.perf_counter() - t0)
print(
    sys.argv[1:],
    f"{p.size / 1e6:.1f} M voxels, min of 3: {min(best):.2f} s",
)
