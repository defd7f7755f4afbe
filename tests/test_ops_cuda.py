"""CUDA kernels against the CPU references (skipped without a GPU; run on a
lent GPU machine with `bash scripts/test.sh tests/test_ops_cuda.py`)."""

import numpy as np
import pytest
import torch

from vllm_lookahead import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from test_tree_ops import random_trees  # noqa: E402


@pytest.mark.parametrize("seed", range(10))
def test_pool_cuda_matches_reference(seed):
    gen = np.random.default_rng(seed)
    state = ops.PoolState.allocate(5, 16, 4, 1, 3, 2, device="cuda")
    ref = ops.PoolState.allocate(5, 16, 4, 1, 3, 2)
    i32 = lambda x, dev: torch.as_tensor(np.asarray(x, np.int32), device=dev)
    for _ in range(4):
        tokens = gen.integers(0, 9, (4, 30))
        slots = gen.permutation(4)  # distinct per call, as the wrapper requires
        starts = gen.integers(0, 10, 4)
        ends = starts + gen.integers(1, 20, 4)
        for st, dev, insert in ((state, "cuda", ops.ngram_pool_insert),
                                (ref, "cpu", reference.ngram_pool_insert)):
            insert(st, i32(slots, dev), i32(tokens, dev), i32(range(4), dev),
                   i32(starts, dev), i32(ends, dev), 9, 4)
        for got, want in zip(state.tensors(), ref.tensors()):
            assert torch.equal(got.cpu(), want)
        query = gen.integers(0, 9, (4, 1))
        got = ops.ngram_pool_lookup(state, i32(slots, "cuda"), i32(query, "cuda"), 5, 4)
        want = reference.ngram_pool_lookup(ref, i32(slots, "cpu"), i32(query, "cpu"), 5, 4)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_tree_attention_cuda_matches_reference(seed, dtype, tol):
    gen = torch.Generator().manual_seed(seed)
    batch, kv_heads, group, head_size, block = 3, 2, 3, [64, 128][seed % 2], 16
    parents, cu = random_trees(gen, batch, max_nodes=90)
    n, num_blocks = len(parents), 32
    prefix = torch.randint(0, 100, (batch,), generator=gen, dtype=torch.int32)
    table = torch.randperm(num_blocks, generator=gen)[: batch * 8].reshape(batch, 8).int()
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)
    cpu_args = [rand(n, kv_heads * group, head_size), rand(n, kv_heads, head_size),
                rand(n, kv_heads, head_size), rand(num_blocks, block, kv_heads, head_size),
                rand(num_blocks, block, kv_heads, head_size), table, prefix, cu,
                ops.tree_ancestor_masks(parents, cu), head_size ** -0.5]
    cuda_args = [a.cuda() if torch.is_tensor(a) else a for a in cpu_args]
    assert torch.equal(ops.tree_ancestor_masks(parents.cuda(), cu.cuda()).cpu(), cpu_args[8])
    got = ops.tree_attention(*cuda_args).float().cpu()
    want = reference.tree_attention(*cpu_args).float()
    err = (got - want).abs().max().item()
    print(f"tree_attention cuda {dtype} max abs err {err:.2e}")
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_kv_compact_cuda_matches_reference():
    keys = [torch.randn(8, 4, 2, 8) for _ in range(2)]
    values = [torch.randn(8, 4, 2, 8) for _ in range(2)]
    src, dst = torch.tensor([3, 5, 6, 9]), torch.tensor([2, 3, 4, 5])
    cuda_k, cuda_v = [k.cuda() for k in keys], [v.cuda() for v in values]
    ops.tree_kv_compact(cuda_k, cuda_v, src.cuda(), dst.cuda())
    reference.tree_kv_compact(keys, values, src, dst)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(cuda_k + cuda_v, keys + values))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_tree_attention_and_compaction_on_the_lbnhc_layout(dtype, tol):
    """vLLM's CUDA backends' layer cache (logical [blocks, kv_heads, block,
    2 * head], physical [blocks, block, kv_heads, 2 * head]) through the
    LBNHC adapter's views, in the cache's own dtype."""
    from vllm_lookahead.tree.backends import LbnhcAdapter

    gen = torch.Generator().manual_seed(3)
    num_blocks, kv_heads, block, head_size = 12, 2, 16, 128
    physical = torch.randn(num_blocks, block, kv_heads, 2 * head_size, generator=gen).to(dtype)
    kv_cache = physical.cuda().transpose(1, 2)
    key_cache, value_cache = LbnhcAdapter().cache_views(kv_cache)
    parents, cu = random_trees(gen, batch=2, max_nodes=40)
    n = len(parents)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype).cuda()
    q, tk, tv = rand(n, 2 * kv_heads, head_size), rand(n, kv_heads, head_size), \
        rand(n, kv_heads, head_size)
    table = torch.tensor([[4, 1, 0, 7, 9], [2, 5, 3, 11, 6]], dtype=torch.int32)
    prefix = torch.tensor([70, 33], dtype=torch.int32)
    masks = ops.tree_ancestor_masks(parents, cu)
    got = ops.tree_attention(q, tk, tv, key_cache, value_cache, table.cuda(), prefix.cuda(),
                             cu.cuda(), masks.cuda(), 0.1).float().cpu()
    want = reference.tree_attention(q.cpu(), tk.cpu(), tv.cpu(), key_cache.cpu(),
                                    value_cache.cpu(), table, prefix, cu, masks, 0.1).float()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)

    src, dst = torch.tensor([40, 41, 45]), torch.tensor([38, 39, 40])
    expected = [key_cache.cpu().contiguous(), value_cache.cpu().contiguous()]
    reference.tree_kv_compact(expected[:1], expected[1:], src, dst)
    LbnhcAdapter().compact([kv_cache], src, dst)
    assert torch.equal(key_cache.cpu(), expected[0])
    assert torch.equal(value_cache.cpu(), expected[1])


@pytest.mark.parametrize("seed", range(10))
def test_recycle_cuda_matches_reference(seed):
    """Successor table update (repeated tokens: the last row wins) and the
    recycled tree walk on CUDA, against the references."""
    gen = torch.Generator().manual_seed(seed)
    vocab, k, n = 50, 4, 64
    table = torch.randint(-1, vocab, (vocab, k), generator=gen, dtype=torch.int32)
    tokens = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    topk = torch.randint(0, vocab, (n, k + 2), generator=gen, dtype=torch.int32)
    want = table.clone()
    reference.recycle_update(want, tokens, topk)
    got = table.cuda()
    ops.recycle_update(got, tokens.cuda(), topk.cuda())
    assert torch.equal(got.cpu(), want)
    parents = torch.tensor([-1, -1, 0, 0, 2, 1, 4, -1], dtype=torch.int32)
    ranks = torch.tensor([0, 1, 0, 3, 1, -1, 2, 2], dtype=torch.int32)
    roots = torch.randint(-1, vocab, (33,), generator=gen, dtype=torch.int32)
    assert torch.equal(
        ops.recycle_tree(got, roots.cuda(), parents.cuda(), ranks.cuda()).cpu(),
        reference.recycle_tree(want, roots, parents, ranks))
