"""Tree ops (ancestor masks, tree attention, KV compaction, greedy
acceptance) against their torch references on random trees."""

import pytest
import torch

from vllm_lookahead import ops, reference
from vllm_lookahead.tree.backends import CpuVecAdapter


def random_trees(gen, batch, max_nodes):
    sizes = torch.randint(0, max_nodes + 1, (batch,), generator=gen)
    parents = []
    for n in sizes.tolist():
        for i in range(n):
            parents.append(int(torch.randint(-1, i, (1,), generator=gen)) if i else -1)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = sizes.cumsum(0)
    return torch.tensor(parents, dtype=torch.int32), cu


@pytest.mark.parametrize("seed", range(20))
def test_ancestor_masks_match_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    parents, cu = random_trees(gen, batch=4, max_nodes=140)
    words = ops.tree_mask_words(cu)
    got = ops.tree_ancestor_masks(parents, cu)
    assert torch.equal(got, reference.tree_ancestor_masks(parents, cu, words))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_tree_attention_matches_reference(seed, dtype, tol):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 5, (1,), generator=gen))
    head_size = [8, 16, 64, 80][seed % 4]
    kv_heads, group = [(1, 4), (2, 2), (4, 1)][seed % 3]
    block_size, num_blocks = [4, 16][seed % 2], 64
    parents, cu = random_trees(gen, batch, max_nodes=70)
    n = len(parents)
    prefix = torch.randint(0, 40, (batch,), generator=gen, dtype=torch.int32)
    max_blocks = 40 // block_size + 1
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks]
    table = table.reshape(batch, max_blocks).to(torch.int32)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    q = rand(n, kv_heads * group, head_size)
    tk, tv = rand(n, kv_heads, head_size), rand(n, kv_heads, head_size)
    kc = rand(num_blocks, block_size, kv_heads, head_size)
    vc = rand(num_blocks, block_size, kv_heads, head_size)
    masks = ops.tree_ancestor_masks(parents, cu)
    args = (q, tk, tv, kc, vc, table, prefix, cu, masks, head_size ** -0.5)
    got = ops.tree_attention(*args)
    want = reference.tree_attention(*args)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_tree_attention_sees_only_ancestors():
    # Node 2's parent is node 0; node 1 is a sibling branch it must ignore.
    parents = torch.tensor([-1, -1, 0], dtype=torch.int32)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    masks = ops.tree_ancestor_masks(parents, cu)
    q = torch.zeros(3, 1, 4)
    tk = torch.zeros(3, 1, 4)
    tv = torch.tensor([[[1.0] * 4], [[100.0] * 4], [[3.0] * 4]])
    cache = torch.zeros(1, 4, 1, 4)
    out = ops.tree_attention(q, tk, tv, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                             torch.zeros(1, dtype=torch.int32), cu, masks, 1.0)
    # Uniform scores: node 2 averages its own value and node 0's.
    assert out[2, 0].tolist() == [2.0] * 4
    assert out[1, 0].tolist() == [100.0] * 4


@pytest.mark.parametrize("seed", range(10))
def test_kv_compact_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (8, 4, 2, 8)
    keys = [torch.randn(*shape, generator=gen) for _ in range(3)]
    values = [torch.randn(*shape, generator=gen) for _ in range(3)]
    # An accepted path moved down to consecutive slots: destinations may be
    # other entries' sources.
    n = int(torch.randint(0, 10, (1,), generator=gen))
    base = int(torch.randint(0, 12, (1,), generator=gen))
    src = torch.sort(torch.randperm(20, generator=gen)[:n]).values + base
    dst = torch.arange(n) + base
    ref_k, ref_v = [k.clone() for k in keys], [v.clone() for v in values]
    ops.tree_kv_compact(keys, values, src, dst)
    reference.tree_kv_compact(ref_k, ref_v, src, dst)
    assert all(torch.equal(a, b) for a, b in zip(keys + values, ref_k + ref_v))


def test_kv_compact_rejects_out_of_range_slots():
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="slot out of range"):
        ops.tree_kv_compact([cache], [cache.clone()], torch.tensor([8]), torch.tensor([0]))


@pytest.mark.parametrize("seed", range(30))
def test_accept_greedy_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 5
    parents, cu = random_trees(gen, batch, max_nodes=20)
    n = len(parents)
    vocab = 3  # tiny, so many paths match
    tokens = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    root = torch.randint(0, vocab, (batch,), generator=gen, dtype=torch.int32)
    node = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    args = (parents, tokens, root, node, cu, 21)
    got, want = ops.tree_accept_greedy(*args), reference.tree_accept_greedy(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_accept_greedy_follows_the_matching_branch():
    # root -> a(5) -> b(6); root -> c(7) -> d(8); the target says 7 then 8 then 9.
    parents = torch.tensor([-1, 0, -1, 2], dtype=torch.int32)
    tokens = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    node_argmax = torch.tensor([0, 0, 8, 9], dtype=torch.int32)
    path, accepted, bonus = ops.tree_accept_greedy(
        parents, tokens, torch.tensor([7], dtype=torch.int32), node_argmax,
        torch.tensor([0, 4], dtype=torch.int32), 4)
    assert accepted.tolist() == [2] and bonus.tolist() == [9]
    assert path[0, :2].tolist() == [2, 3]


def test_bad_trees_raise():
    with pytest.raises(ValueError, match="parents must precede"):
        ops.tree_ancestor_masks(torch.tensor([-1, 1], dtype=torch.int32),
                                torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="fit the masks"):
        ops.tree_ancestor_masks(torch.full((65,), -1, dtype=torch.int32),
                                torch.tensor([0, 65], dtype=torch.int32), words=1)


def test_ops_work_on_vllm_cpu_backend_cache_layout():
    """vLLM's CPU_ATTN cache [num_blocks, kv_heads, block_size, 2 * head_size]
    through strided views, for attention and compaction."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, kv_heads, block_size, head_size = 6, 2, 32, 16
    kv_cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_size, generator=gen)
    key_view, value_view = CpuVecAdapter().cache_views(kv_cache)
    assert not key_view.is_contiguous()
    parents, cu = random_trees(gen, batch=2, max_nodes=12)
    n = len(parents)
    q = torch.randn(n, 4, head_size, generator=gen)
    tk, tv = torch.randn(n, 2, head_size, generator=gen), torch.randn(n, 2, head_size, generator=gen)
    table = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    prefix = torch.tensor([70, 33], dtype=torch.int32)
    masks = ops.tree_ancestor_masks(parents, cu)
    args = (q, tk, tv, key_view, value_view, table, prefix, cu, masks, 0.25)
    dense = (q, tk, tv, key_view.contiguous(), value_view.contiguous(), table, prefix, cu,
             masks, 0.25)
    torch.testing.assert_close(ops.tree_attention(*args), reference.tree_attention(*dense),
                               atol=2e-5, rtol=2e-5)

    src, dst = torch.tensor([40, 41, 45]), torch.tensor([38, 39, 40])
    expected = [key_view.contiguous(), value_view.contiguous()]
    reference.tree_kv_compact(expected[:1], expected[1:], src, dst)
    ops.tree_kv_compact([key_view], [value_view], src, dst)
    assert torch.equal(key_view, expected[0]) and torch.equal(value_view, expected[1])
