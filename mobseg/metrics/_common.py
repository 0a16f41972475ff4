"""Shared helpers of the metric modules: input checks and chunked iteration.

Every accumulator of :mod:`mobseg.metrics` takes arrays of any shape and walks
them in flat chunks of at most :data:`CHUNK_VOXELS` voxels, so the temporaries
of one update stay a few megabytes even for a 512 x 512 x 300 volume.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Voxels per chunk of the streamed computations (2 Mi voxels: about 17 MB of
#: float64 temporaries per intermediate array).
CHUNK_VOXELS = 1 << 21

#: Tolerance on probabilities: values in [-PROB_TOL, 1 + PROB_TOL] are accepted
#: (float32 rounding of sums of probabilities), anything further out is an error.
PROB_TOL = 1e-5


def check_same_shape(**arrays: np.ndarray) -> None:
    """Raise ValueError naming every shape unless all ``arrays`` have one shape.

    Args:
        **arrays: Arrays by name, e.g. ``prob=p, target=t``.
    """
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Shapes differ: {desc}; all must be equal.")


def flat_chunks(*arrays: np.ndarray, chunk: int = CHUNK_VOXELS) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield aligned flat chunks of equally shaped arrays.

    Contiguous inputs are sliced without copying; non-contiguous ones (for
    example a cropped view) are copied one slab along axis 0 at a time.

    Args:
        *arrays: Arrays of one shape (N1, N2, ...); ``None`` entries yield None.
        chunk: Maximum voxels per chunk.

    Yields:
        Tuples of 1-D arrays (or None), each of at most ``chunk`` elements.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        return
    shape = np.shape(present[0])
    if len(shape) == 0:
        yield tuple(None if a is None else np.reshape(a, -1) for a in arrays)
        return
    if all(a.flags.c_contiguous for a in present):
        flats = [None if a is None else a.reshape(-1) for a in arrays]
        n = present[0].size
        for start in range(0, n, chunk):
            yield tuple(None if f is None else f[start : start + chunk] for f in flats)
        return
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows = max(1, chunk // max(per_row, 1))
    for start in range(0, shape[0], rows):
        yield tuple(None if a is None else a[start : start + rows].reshape(-1) for a in arrays)


def as_bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """A flat or shaped 0/1 mask as a bool array (no copy for bool or 0/1 uint8).

    Args:
        mask: Array of 0/1 values (bool, integer or float).
        name: Name used in the error message.

    Raises:
        ValueError: the mask holds values other than 0 and 1.
    """
    if mask.dtype == np.bool_:
        return mask
    if mask.size:
        lo, hi = mask.min(), mask.max()
        if not (lo >= 0 and hi <= 1):
            raise ValueError(
                f"The {name} must hold only 0 and 1, found values in [{lo}, {hi}] "
                f"(shape {mask.shape})."
            )
        if mask.dtype.kind == "f" and not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"The {name} must hold only 0 and 1, found fractions.")
    if mask.dtype in (np.uint8, np.int8):
        return mask.view(np.bool_)
    return mask != 0


def check_probability(prob: np.ndarray, name: str = "probability") -> None:
    """Raise ValueError when ``prob`` holds NaN or values outside [0, 1].

    Values within :data:`PROB_TOL` of the interval are accepted.
    """
    if prob.dtype.kind != "f":
        raise ValueError(f"The {name} must be a floating-point array, got {prob.dtype}.")
    if prob.size == 0:
        return
    lo, hi = float(prob.min()), float(prob.max())
    if np.isnan(lo) or np.isnan(hi):
        raise ValueError(f"The {name} holds NaN values.")
    if lo < -PROB_TOL or hi > 1 + PROB_TOL:
        raise ValueError(f"The {name} must lie in [0, 1], found values in [{lo:.6g}, {hi:.6g}].")


def check_finite_nonnegative(score: np.ndarray, name: str = "score") -> None:
    """Raise ValueError when ``score`` holds NaN, infinities or negative values.

    Tiny negative values (>= -1e-6, rounding of E[p^2] - E[p]^2) are accepted.
    """
    if score.size == 0:
        return
    lo, hi = float(score.min()), float(score.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"The {name} holds NaN or infinite values.")
    if lo < -1e-6:
        raise ValueError(f"The {name} must be >= 0, found {lo:.6g}.")


def nan_if_zero(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or NaN when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else float("nan")
