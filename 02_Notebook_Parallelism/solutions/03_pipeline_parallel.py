"""Solutions to the two exercises of ``03_pipeline_parallel.ipynb``: interleaved 1F1B's step time and bubble, and
its peak live activations per rank.

``tests/test_notebooks.py`` runs each of the notebook's check cells against its stub (it must fail) and against
this file (it must pass).
"""


def interleaved_step(p: int, m: int, v: int) -> tuple[float, float]:
    # (time units of one step, bubble) of interleaved 1F1B: p ranks, m micro-batches, v stages per rank
    work = 3 * m  # each rank: v stages x m micro-batches x (1 + 2) / v units
    # fill and drain: the last rank starts after p - 1 stage forwards (1/v each), and the first rank's last
    # backward comes p - 1 stage backwards (2/v each) after the last rank's: every rank idles 3(p - 1)/v in all
    fill_drain = 3 * (p - 1) / v
    step = work + fill_drain
    return step, fill_drain / step  # = (p - 1) / (v * m + p - 1)


def interleaved_peak_activations(p: int, m: int, v: int) -> list[int]:
    # per rank: the most (stage, micro-batch) forwards done whose backward is not, in interleaved 1F1B
    # warm-up of rank r (Megatron-LM's count): one full round of its other v - 1 stages over all p ranks, plus
    # 2 per rank after it (a forward goes out to the last rank and the first backward comes back); then the
    # steady state runs one more forward before each backward. Capped by the v * m forwards it has.
    return [min(v * m, (v - 1) * p + 2 * (p - 1 - r) + 1) for r in range(p)]
