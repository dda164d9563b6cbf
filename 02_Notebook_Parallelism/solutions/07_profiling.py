"""Solution to the exercise of ``07_profiling.ipynb``: exposed (non-overlapped) communication time.

``tests/test_notebooks.py`` runs the notebook's check cell against the stub (it must fail) and against this
file (it must pass).
"""


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same time as ``intervals``."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def exposed(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    # time covered by some interval of comm and by no interval of compute
    busy = _union(compute)
    total = 0
    for a, b in _union(comm):
        hidden = sum(max(0, min(b, d) - max(a, c)) for c, d in busy)  # disjoint: no double counting
        total += (b - a) - hidden
    return total
