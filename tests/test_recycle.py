"""Token recycling: the successor table ops against their references, the
tree template, and the table's update rules."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vllm_lookahead import ops, reference
from vllm_lookahead.proposers.recycle import SuccessorTable, chain_depths, chain_tokens, tree_template

i32 = lambda *v: torch.tensor(v, dtype=torch.int32)


@st.composite
def updates(draw):
    vocab, k = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    n = draw(st.integers(0, 20))
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    topk = draw(st.lists(st.lists(st.integers(-1, vocab - 1), min_size=k + 1, max_size=k + 1),
                         min_size=n, max_size=n))
    start = draw(st.lists(st.integers(-1, vocab - 1), min_size=vocab * k,
                          max_size=vocab * k))
    return (torch.tensor(start, dtype=torch.int32).reshape(vocab, k),
            torch.tensor(tokens, dtype=torch.int32),
            torch.tensor(topk, dtype=torch.int32).reshape(n, k + 1))


@settings(max_examples=200, deadline=None)
@given(updates())
def test_recycle_update_matches_reference(case):
    table, tokens, topk = case
    want = table.clone()
    reference.recycle_update(want, tokens, topk)
    ops.recycle_update(table, tokens, topk)
    assert torch.equal(table, want)


def test_recycle_update_last_row_wins_and_checks_tokens():
    table = torch.full((4, 2), -1, dtype=torch.int32)
    ops.recycle_update(table, i32(1, 2, 1), i32(0, 3, 2, 2, 3, 0).reshape(3, 2))
    assert table.tolist() == [[-1, -1], [3, 0], [2, 2], [-1, -1]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ops.recycle_update(table, i32(4), i32(0, 0).reshape(1, 2))
    with pytest.raises(ValueError, match="one row per token"):
        ops.recycle_update(table, i32(1, 2), i32(0, 0).reshape(1, 2))
    with pytest.raises(ValueError, match="ranks"):
        ops.recycle_update(table, i32(1), i32(0).reshape(1, 1))


@st.composite
def walks(draw):
    vocab, k = draw(st.integers(1, 10), ), draw(st.integers(1, 4))
    table = draw(st.lists(st.integers(-1, vocab - 1), min_size=vocab * k, max_size=vocab * k))
    t = draw(st.integers(0, 12))
    parents = [draw(st.integers(-1, j - 1)) for j in range(t)]
    ranks = draw(st.lists(st.integers(-1, k), min_size=t, max_size=t))
    roots = draw(st.lists(st.integers(-1, vocab), min_size=0, max_size=6))
    return (torch.tensor(table, dtype=torch.int32).reshape(vocab, k),
            torch.tensor(roots, dtype=torch.int32), torch.tensor(parents, dtype=torch.int32),
            torch.tensor(ranks, dtype=torch.int32))


@settings(max_examples=200, deadline=None)
@given(walks())
def test_recycle_tree_matches_reference(case):
    table, roots, parents, ranks = case
    assert torch.equal(ops.recycle_tree(table, roots, parents, ranks),
                       reference.recycle_tree(table, roots, parents, ranks))


def test_recycle_tree_reads_successors_and_disables_subtrees():
    # 0 -> (1, 2), 1 -> (3, 0), 2 -> (-1, 1), 3 unknown
    table = i32(1, 2, 3, 0, -1, 1, -1, -1).reshape(4, 2)
    parents, ranks = i32(-1, -1, 0, 0, 1), i32(0, 1, 0, 1, 0)
    assert ops.recycle_tree(table, i32(0), parents, ranks).tolist() == [[1, 2, 3, 0, -1]]
    # Disabling node 0 drops its children too.
    assert ops.recycle_tree(table, i32(0), parents, i32(-1, 1, 0, 1, 0)).tolist() == [
        [-1, 2, -1, -1, -1]]
    with pytest.raises(ValueError, match="earlier node"):
        ops.recycle_tree(table, i32(0), i32(-1, 1), i32(0, 0))


@pytest.mark.parametrize("nodes,ranks,depth", [(48, 8, 8), (16, 4, 3), (5, 1, 10)])
def test_tree_template_is_a_best_first_tree(nodes, ranks, depth):
    parents, edge_ranks = tree_template(nodes, ranks, depth)
    assert len(parents) == min(nodes, sum(ranks ** d for d in range(1, depth + 1)))
    assert all(-1 <= p < j for j, p in enumerate(parents))
    assert ((0 <= edge_ranks) & (edge_ranks < ranks)).all()
    depths = np.zeros(len(parents), np.int64)
    for j, p in enumerate(parents):
        depths[j] = 1 if p < 0 else depths[p] + 1
    assert depths.max() <= depth
    # Siblings distinct; rank-0 chain first.
    pairs = set(zip(parents.tolist(), edge_ranks.tolist()))
    assert len(pairs) == len(parents)
    assert parents[0] == -1 and edge_ranks[0] == 0
    if ranks == 1:
        assert parents.tolist() == list(range(-1, len(parents) - 1))


def test_successor_table_drops_tokens_outside_the_vocabulary():
    table = SuccessorTable(vocab_size=5, ranks=2)
    assert table.nbytes() == 5 * 2 * 4
    # Row of token 7 dropped; successor 9 (a padded logit) becomes unknown.
    table.update(np.array([1, 7, 2]), np.array([[2, 9], [1, 1], [3, 4]]))
    assert table.table.tolist() == [[-1, -1], [2, -1], [3, 4], [-1, -1], [-1, -1]]
    parents, ranks = np.array([-1, 0, 0], np.int32), np.array([0, 0, 1], np.int32)
    assert table.trees(np.array([1, 0]), parents, ranks).tolist() == [[2, 3, 4],
                                                                      [-1, -1, -1]]


def _longest_match_reference(context: list[int], length: int,
                             max_ngram: int) -> tuple[list[int], int]:
    """Brute force: the longest suffix (<= max_ngram) seen earlier, its
    earliest occurrence, what followed it; and the suffix's length."""
    n = len(context)
    for size in range(min(max_ngram, n - 1), 0, -1):
        suffix = context[n - size:]
        for start in range(n - size):
            if context[start:start + size] == suffix:
                return context[start + size:start + size + length], size
    return [], 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=30), min_size=1, max_size=4),
       st.integers(1, 6), st.integers(1, 4))
def test_chain_tokens_match_the_reference(contexts, length, max_ngram):
    out, sizes = chain_tokens([np.asarray(c, np.int32) for c in contexts], length, max_ngram)
    for row, size, context in zip(out, sizes, contexts):
        expected, expected_size = _longest_match_reference(context, length, max_ngram)
        assert row.tolist() == expected + [-1] * (length - len(expected))
        assert size == expected_size


@pytest.mark.parametrize("nodes,chain", [(48, 8), (0, 5), (3, 1)])
def test_tree_template_holds_the_chain(nodes, chain):
    parents, ranks = tree_template(nodes, 8, 8, chain)
    depths = chain_depths(parents, ranks)
    assert sorted(depths[depths >= 0].tolist()) == list(range(chain))
    assert (ranks >= 0).sum() == nodes
    # A chain node hangs under the root or the chain node one shallower.
    for j in np.flatnonzero(depths >= 0):
        assert (parents[j] < 0) if depths[j] == 0 else depths[parents[j]] == depths[j] - 1
