"""Solutions to the exercises of ``05_mixed_precision.ipynb``: GradScaler's update rule, and the smallest loss scale.

``tests/test_notebooks.py`` runs each check cell of the notebook against its stub (it must fail) and against this
file (it must pass).
"""

import math

import torch


def scale_sequence(found_inf: list[bool], init_scale: float = 2.0**16, growth_interval: int = 3) -> list[float]:
    # the scale used at each step, given whether that step's gradients held an inf/nan
    scale, scales, good_steps = init_scale, [], 0
    for inf in found_inf:
        scales.append(scale)
        if inf:  # overflow: the step is skipped, the scale halved, the count of good steps starts again
            scale, good_steps = scale * 0.5, 0
        else:
            good_steps += 1
            if good_steps == growth_interval:  # growth_interval good steps in a row: try a larger scale
                scale, good_steps = scale * 2.0, 0
    return scales


def min_loss_scale(grad: torch.Tensor) -> float:
    # smallest 2^k, k >= 0, with (grad * 2^k).half() != 0 wherever grad != 0
    nonzero = grad[grad != 0].abs()
    if nonzero.numel() == 0:
        return 1.0
    # fp16 rounds |v| <= 2^-25 (half the smallest subnormal, 2^-24; the tie goes to the even 0) to 0, anything
    # larger to at least 2^-24: the smallest entry m needs m * 2^k > 2^-25. With m = f * 2^e, f in [0.5, 1):
    # f > 0.5 needs e + k >= -24; f == 0.5 (m a power of two) needs one more.
    f, e = math.frexp(nonzero.min().item())
    k = -24 - e + (1 if f == 0.5 else 0)
    return 2.0 ** max(k, 0)
