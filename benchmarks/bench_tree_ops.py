"""Microbenchmark of the tree ops against the best torch alternatives.

Tree attention: the compiled op vs torch SDPA over the gathered prefix + tree
keys with a dense boolean mask (the mask built per step in Python, as an
integration without the op would do), vs FlexAttention (compiled) over the
packed batch with the same mask as a block mask (``--flex``, default on
CUDA), and vs the float64 reference.
KV compaction: the op vs torch index_copy_ per layer. Runs on CUDA when
available (--device cuda), else CPU. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_lookahead import ops, reference  # noqa: E402


def timed(fn, device: str, repeat: int = 5) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def chain_forest(batch: int, nodes: int, branches: int = 4):
    """``branches`` chains per request sharing the root: a lookahead-like tree."""
    depth = nodes // branches
    parents = []
    for _ in range(batch):
        for br in range(branches):
            for d in range(depth):
                parents.append(-1 if d == 0 else br * depth + d - 1)
    cu = torch.arange(batch + 1, dtype=torch.int32) * branches * depth
    return torch.tensor(parents, dtype=torch.int32), cu


def sdpa_dense(q, tk, tv, kc, vc, table, prefix, cu, parents, scale):
    """Per request: gather prefix KV, build the ancestor mask densely in
    Python/torch, run SDPA."""
    outs = []
    block = kc.shape[1]
    for b in range(len(prefix)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        n = hi - lo
        pos = torch.arange(int(prefix[b]), device=q.device)
        slots = table[b, pos // block].long() * block + pos % block
        keys = torch.cat([kc.flatten(0, 1)[slots], tk[lo:hi]])
        values = torch.cat([vc.flatten(0, 1)[slots], tv[lo:hi]])
        anc = torch.eye(n, dtype=torch.bool, device=q.device)
        par = parents[lo:hi].tolist()
        for i in range(n):
            if par[i] >= 0:
                anc[i] |= anc[par[i]]
        mask = torch.cat([torch.ones(n, len(pos), dtype=torch.bool, device=q.device), anc], 1)
        group = q.shape[1] // tk.shape[1]
        outs.append(F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), keys.repeat_interleave(group, 1).transpose(0, 1),
            values.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask,
            scale=scale).transpose(0, 1))
    return torch.cat(outs)


def flex_dense(q, tk, tv, kc, vc, table, prefix, cu, parents, scale, flex):
    """The whole batch as one packed sequence for FlexAttention: every
    request's gathered prefix then its tree keys; the allowed (query, key)
    pairs as a dense mask turned into a block mask each step."""
    from torch.nn.attention.flex_attention import create_block_mask

    block = kc.shape[1]
    keys, values, allowed_rows = [], [], []
    total = 0
    spans = []
    for b in range(len(prefix)):
        lo, hi = int(cu[b]), int(cu[b + 1])
        pos = torch.arange(int(prefix[b]), device=q.device)
        slots = table[b, pos // block].long() * block + pos % block
        keys.append(torch.cat([kc.flatten(0, 1)[slots], tk[lo:hi]]))
        values.append(torch.cat([vc.flatten(0, 1)[slots], tv[lo:hi]]))
        spans.append((lo, hi, total, len(pos)))
        total += len(pos) + hi - lo
    allowed = torch.zeros(len(q), total, dtype=torch.bool, device=q.device)
    for lo, hi, start, p in spans:
        n = hi - lo
        anc = torch.eye(n, dtype=torch.bool, device=q.device)
        par = parents[lo:hi].tolist()
        for i in range(n):
            if par[i] >= 0:
                anc[i] |= anc[par[i]]
        allowed[lo:hi, start:start + p] = True
        allowed[lo:hi, start + p:start + p + n] = anc

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]

    mask = create_block_mask(mask_mod, None, None, len(q), total, device=q.device)
    k = torch.cat(keys).transpose(0, 1)[None]
    v = torch.cat(values).transpose(0, 1)[None]
    out = flex(q.transpose(0, 1)[None], k, v, block_mask=mask, scale=scale,
               enable_gqa=q.shape[1] != tk.shape[1])
    return out[0].transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--nodes", default="16,64")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                        help="also time FlexAttention (default: on CUDA)")
    args = parser.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    block, D = 16, args.head_size
    print(f"device {dev}, {args.dtype}, heads {args.heads}/{args.kv_heads}, head size {D}, "
          f"prefix {args.prefix}, threads {torch.get_num_threads()}\n")
    use_flex = dev == "cuda" if args.flex is None else args.flex
    if use_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention) if dev == "cuda" else flex_attention
    print("| batch | nodes/req | tree_attention op ms | SDPA + dense mask ms | speedup "
          "| FlexAttention ms | max abs err vs fp64 ref | kv_compact op ms (24 layers) "
          "| index_copy_ ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in map(int, args.batches.split(",")):
        for nodes in map(int, args.nodes.split(",")):
            parents, cu = chain_forest(batch, nodes)
            n = len(parents)
            blocks_per_req = (args.prefix + nodes) // block + 1
            num_blocks = batch * blocks_per_req
            table = torch.arange(num_blocks, dtype=torch.int32).reshape(batch, -1)
            prefix = torch.full((batch,), args.prefix, dtype=torch.int32)
            mk = lambda *s: torch.randn(*s, dtype=dtype, device=dev)
            q, tk, tv = mk(n, args.heads, D), mk(n, args.kv_heads, D), mk(n, args.kv_heads, D)
            kc, vc = mk(num_blocks, block, args.kv_heads, D), mk(num_blocks, block, args.kv_heads, D)
            on = lambda t: t.to(dev)
            masks = ops.tree_ancestor_masks(on(parents), on(cu))
            call = (q, tk, tv, kc, vc, on(table), on(prefix), on(cu), masks, D ** -0.5)
            t_op = timed(lambda: ops.tree_attention(*call), dev)
            t_sdpa = timed(lambda: sdpa_dense(q, tk, tv, kc, vc, on(table), prefix, cu,
                                              parents, D ** -0.5), dev)
            t_flex = "-"
            if use_flex:
                flex_call = (q, tk, tv, kc, vc, on(table), prefix, cu, parents, D ** -0.5, flex)
                flex_err = (flex_dense(*flex_call).float().cpu()
                            - ops.tree_attention(*call).float().cpu()).abs().max().item()
                assert flex_err < (2e-2 if dtype != torch.float32 else 1e-3), flex_err
                t_flex = f"{timed(lambda: flex_dense(*flex_call), dev):.3f}"
            got = ops.tree_attention(*call).float().cpu()
            ref = reference.tree_attention(*(t.cpu() if torch.is_tensor(t) else t
                                                 for t in call)).float()
            err = (got - ref).abs().max().item()
            layers_k = [mk(num_blocks, block, args.kv_heads, D) for _ in range(24)]
            layers_v = [mk(num_blocks, block, args.kv_heads, D) for _ in range(24)]
            depth = nodes // 4
            src = torch.cat([torch.arange(depth) + b * blocks_per_req * block + args.prefix + depth
                             for b in range(batch)]).to(dev)
            dst = src - depth
            t_compact = timed(lambda: ops.tree_kv_compact(layers_k, layers_v, src, dst), dev)

            def index_copy():
                for c in layers_k + layers_v:
                    flat = c.view(-1, args.kv_heads, D)
                    flat.index_copy_(0, dst, flat.index_select(0, src))

            t_copy = timed(index_copy, dev)
            print(f"| {batch} | {nodes} | {t_op:.3f} | {t_sdpa:.3f} | {t_sdpa / t_op:.1f}x "
                  f"| {t_flex} | {err:.1e} | {t_compact:.3f} | {t_copy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
