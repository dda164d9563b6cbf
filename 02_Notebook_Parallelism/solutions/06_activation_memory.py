"""Solutions to the exercises of ``06_activation_memory.ipynb``: one block's saved bytes, and the pack hook.

``tests/test_notebooks.py`` runs each check cell of the notebook against its stub (it must fail) and against this
file (it must pass).
"""

import torch


def block_saved_bytes(dim: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, batch: int, seq: int) -> int:
    # bytes one block saves for backward: count the tensors of section 2 for these sizes
    kv = n_kv_heads * (dim // n_heads)  # k and v width under grouped-query attention
    norms = 2 * (3 * dim + 1)  # per RMSNorm: its input, 1/rms, the normalised x, its output (the matmuls' input)
    attention = 2 * dim + 2 * kv + n_heads  # q and k after RoPE, v, the SDPA output (wo's input), the log-sum-exp
    swiglu = 4 * ffn_hidden  # w1 x, silu(w1 x), w3 x, and their product (w2's input)
    return 4 * batch * seq * (norms + attention + swiglu)  # fp32: 4 bytes per element


def count_saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    # bytes of the tensors autograd saves while fn() runs: each storage once, `exclude`'s storages not at all
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()  # a storage saved again overwrites itself: counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
