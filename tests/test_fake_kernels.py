"""Every compiled op has a fake (meta) kernel that agrees with the real one
(``torch.library.opcheck``: schema, fake tensors, AOT dispatch), so the ops
compose with torch.compile."""

import pytest
import torch

from vllm_lookahead import ops
from vllm_lookahead.ops import PoolState

i32 = lambda *v: torch.tensor(v, dtype=torch.int32)


def pool_args():
    state = PoolState.allocate(3, 8, 2, 1, 2, 2)
    return state, (*state.tensors(), state.ways)


def tree_args():
    gen = torch.Generator().manual_seed(0)
    parents, cu = i32(-1, 0, -1, 2, -1), i32(0, 4, 5)
    masks = ops.tree_ancestor_masks(parents, cu)
    q = torch.randn(5, 2, 8, generator=gen)
    k, v = torch.randn(5, 1, 8, generator=gen), torch.randn(5, 1, 8, generator=gen)
    kc, vc = torch.randn(4, 16, 1, 8, generator=gen), torch.randn(4, 16, 1, 8, generator=gen)
    return parents, cu, masks, q, k, v, kc, vc


def cases():
    state, pool = pool_args()
    tokens = torch.tensor([[1, 2, 3, 1, 2, 4]], dtype=torch.int32)
    parents, cu, masks, q, k, v, kc, vc = tree_args()
    table = i32(0, 1, 2, 3).reshape(2, 2)
    yield "ngram_pool_insert", (*pool, i32(0), tokens, i32(0), i32(0), i32(6), 10, -1)
    yield "ngram_pool_lookup", (*pool, i32(0, 1), i32(1, 2).reshape(2, 1), 3, -1)
    yield "lookahead_tree_layout", (
        torch.arange(6, dtype=torch.int32).reshape(1, 2, 3), i32(2), i32(3),
        torch.arange(4, dtype=torch.int32).reshape(1, 2, 2), i32(2, 1).reshape(1, 2),
        i32(5, 0, -1).reshape(1, 3), i32(-1, 0, -1), i32(16), 8)
    successors = torch.full((8, 2), -1, dtype=torch.int32)
    yield "recycle_update", (successors, i32(1, 3, 1), i32(2, 3, 4, 5, 6, 7).reshape(3, 2))
    yield "recycle_tree", (torch.arange(16, dtype=torch.int32).reshape(8, 2) % 8, i32(1, 3),
                           i32(-1, 0, -1, 1), i32(0, 1, 1, 0))
    yield "tree_ancestor_masks", (parents, cu, 1)
    yield "tree_attention", (q, k, v, kc, vc, table, i32(20, 3), cu, masks, 0.3)
    yield "tree_kv_compact", ([kc.clone()], [vc.clone()], torch.tensor([5, 6]),
                              torch.tensor([1, 2]))
    yield "tree_accept_greedy", (parents, i32(4, 5, 6, 7, 8), i32(6, 9), i32(1, 2, 7, 3, 4),
                                 cu, 4)


@pytest.mark.parametrize("name, args", list(cases()), ids=[n for n, _ in cases()])
def test_fake_kernel_matches_the_op(name, args):
    torch.library.opcheck(getattr(torch.ops.vllm_lookahead, name).default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


def test_tree_attention_compiles_without_graph_breaks():
    parents, cu, masks, q, k, v, kc, vc = tree_args()
    table, prefix = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), i32(20, 3)
    compiled = torch.compile(ops.tree_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, kc, vc, table, prefix, cu, masks, 0.3),
                               ops.tree_attention(q, k, v, kc, vc, table, prefix, cu, masks,
                                                  0.3))
