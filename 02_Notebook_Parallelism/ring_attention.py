"""Ring attention (context parallelism) on real processes: each rank holds a slice of the sequence.

The sequence is cut into 2N chunks. Rank r holds the queries, keys and values of two of them: chunks 2r and
2r+1 (``naive``: contiguous) or chunks r and 2N-1-r (``zigzag``: load-balanced for a causal mask). In N steps
the key/value blocks travel around the ring (``batch_isend_irecv`` to rank r+1, from rank r-1, started before
the step's compute so that communication overlaps it); each rank merges the partial attention of its queries
with every block by the online-softmax rule (running max, running sum). Blocks from the future are skipped,
the diagonal ones causally masked. Rank 0 gathers the outputs and saves them with the inputs, the work per
rank and step, and what ``torch.distributed.tensor.experimental.context_parallel`` does on this device, for
``08_context_parallel.ipynb`` to check against ``F.scaled_dot_product_attention`` on the full sequence.

    torchrun --standalone --nproc_per_node=4 02_Notebook_Parallelism/ring_attention.py --out /tmp/ring.pt  # CPU
    sbatch --wrap "torchrun --nproc_per_node=4 02_Notebook_Parallelism/ring_attention.py --out ring.pt"
"""

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh


def owned(rank: int, n: int, layout: str) -> list[int]:
    """The two chunks (of 2n) whose queries, keys and values ``rank`` holds."""
    return [2 * rank, 2 * rank + 1] if layout == "naive" else [rank, 2 * n - 1 - rank]


def update(state, q, k, v, diag: bool):
    """Merge the attention of q to one key/value block into (acc, running max, running sum)."""
    acc, m, s = state
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if diag:  # the same chunk: query i sees keys 0..i only
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
    p = torch.exp(scores - m_new)
    rescale = torch.exp(m - m_new)  # the old terms were exponentiated against a smaller max
    return acc * rescale + p @ v, m_new, s * rescale + p.sum(-1, keepdim=True)


def ring(q, k, v, layout: str, causal: bool) -> tuple[torch.Tensor, list[float]]:
    """This rank's attention output (its 2 chunks) and the scores it computed in each step."""
    rank, n = dist.get_rank(), dist.get_world_size()
    c, d = q.shape[2] // 2, q.shape[-1]
    mine = owned(rank, n, layout)
    states = [(torch.zeros_like(qc), torch.full(qc.shape[:-1] + (1,), float("-inf")), torch.zeros(qc.shape[:-1] + (1,)))
              for qc in q.split(c, 2)]  # fmt: skip
    kv, work = torch.cat([k, v], -1), []  # one message per step: the keys and values of 2 chunks
    for step in range(n):
        src = (rank - step) % n  # whose block we hold in this step
        if step < n - 1:  # start passing it on now: the transfer runs while we compute
            nxt = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, (rank + 1) % n),
                                           dist.P2POp(dist.irecv, nxt, (rank - 1) % n)])  # fmt: skip
        kb, vb = kv.split(d, -1)
        work.append(0.0)
        for i, qc in enumerate(mine):
            for j, kc in enumerate(owned(src, n, layout)):
                if causal and kc > qc:
                    continue  # a block from the future: nothing to compute
                diag = causal and kc == qc
                states[i] = update(states[i], q[:, :, i * c : (i + 1) * c], kb[:, :, j * c : (j + 1) * c],
                                   vb[:, :, j * c : (j + 1) * c], diag)  # fmt: skip
                work[-1] += c * (c + 1) / 2 if diag else c * c
        if step < n - 1:
            for req in reqs:
                req.wait()
            kv = nxt
    return torch.cat([acc / s for acc, _, s in states], 2), work


def try_torch_context_parallel(q, k, v, layout_check: list[int]) -> dict:
    """Run torch's experimental context_parallel on the same inputs: its sharding, and its SDPA if it runs."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard  # not exported (2.13)

    n = dist.get_world_size()
    mesh = init_device_mesh(q.device.type, (n,), mesh_dim_names=("cp",))
    qs, ks, vs = q.clone(), k.clone(), v.clone()
    result: dict = {}
    with context_parallel(mesh, buffers=[qs, ks, vs], buffer_seq_dims=[2, 2, 2]):  # shards the buffers in place
        c = q.shape[2] // (2 * n)
        mine = torch.cat([q[:, :, i * c : (i + 1) * c] for i in layout_check], 2)
        result["shard_is_zigzag"] = bool(torch.equal(qs, mine))
        try:
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            (full,) = context_parallel_unshard(mesh, [out], [2])
            result["output"] = full.detach().clone()
        except Exception as e:  # noqa: BLE001 - reported to the notebook, not hidden
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return result


def main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    assert args.seq_len % (2 * n) == 0, f"--seq-len must be divisible by 2 x world size = {2 * n}"
    torch.manual_seed(0)  # the full q, k, v on every rank: only for the check (a real run never has them)
    q, k, v = (torch.randn(1, args.heads, args.seq_len, args.head_dim) for _ in range(3))
    c = args.seq_len // (2 * n)
    results = {}
    for layout in ("naive", "zigzag"):
        idx = owned(rank, n, layout)
        shard = lambda t: torch.cat([t[:, :, i * c : (i + 1) * c] for i in idx], 2)  # this rank's 2 chunks
        for causal in (True, False):
            out, work = ring(shard(q), shard(k), shard(v), layout, causal)
            outs = [torch.empty_like(out) for _ in range(n)]
            dist.all_gather(outs, out)
            works = [None] * n
            dist.all_gather_object(works, work)
            full = torch.empty_like(q)
            for r in range(n):  # put every rank's chunks back in sequence order
                for j, chunk in enumerate(owned(r, n, layout)):
                    full[:, :, chunk * c : (chunk + 1) * c] = outs[r][:, :, j * c : (j + 1) * c]
            results[layout, causal] = {"output": full, "work": works}
    cp = try_torch_context_parallel(q, k, v, owned(rank, n, "zigzag"))
    cps = [None] * n
    dist.all_gather_object(cps, cp.get("shard_is_zigzag"))
    if rank == 0:
        cp["shard_is_zigzag"] = cps
        torch.save({"world": n, "qkv": (q, k, v), "results": results, "torch_cp": cp}, args.out)
        print(f"rank 0: ring attention on {n} processes saved to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="file rank 0 saves the inputs, outputs and work counts to")
    p.add_argument("--seq-len", type=int, default=64, help="tokens in the full sequence (divisible by 2 x ranks)")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--head-dim", type=int, default=16, help="features per head")
    main(p.parse_args())
