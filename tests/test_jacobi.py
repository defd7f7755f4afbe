"""The lookahead branch without an engine: window warm-up and update, tree
layout, budget fitting, and the tree-mode proposer's bookkeeping."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_lookahead import LookaheadProposer, patches
from vllm_lookahead.proposers.jacobi import JacobiWindow, fit_tree, tree_layout


def test_window_warms_up_then_emits_one_ngram_per_column():
    window = JacobiWindow.from_context(np.arange(10, 20, dtype=np.int32), levels=2, window=3)
    level0 = window.levels[0].copy()
    assert window.filled == 1
    assert window.advance(np.array([1, 2, 3], dtype=np.int32)) is None
    assert window.filled == 2
    ngrams = window.advance(np.array([4, 5, 6], dtype=np.int32))
    # Column j read downwards, then the new argmax: an n-gram of N = 3.
    assert ngrams.tolist() == [[level0[0], 1, 4], [level0[1], 2, 5], [level0[2], 3, 6]]
    assert window.levels.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_window_with_ngram_2_is_full_from_the_start():
    window = JacobiWindow.from_context(np.arange(5, dtype=np.int32), levels=1, window=2)
    first = window.levels[0].copy()
    assert window.advance(np.array([7, 8], dtype=np.int32)).tolist() == \
        [[first[0], 7], [first[1], 8]]


def test_tree_layout_follows_the_design():
    window = JacobiWindow(levels=np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32), filled=2)
    candidates = np.array([[7, 8], [7, 9], [3, 3]], dtype=np.int32)
    tokens, parents = tree_layout(window, 3, candidates)
    # Level 0 is a chain from the root; level 1 column j hangs under level 0
    # column j; candidates form a trie (7 shared).
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3]
    assert parents.tolist() == [-1, 0, 1, 0, 1, 2, -1, 6, 6, -1, 9]


@pytest.mark.parametrize("cap", range(0, 40))
def test_fit_tree_respects_the_cap(cap):
    w, g = fit_tree(cap, window=5, guesses=5, filled=3, cont_len=3)
    assert 0 <= w <= 5 and 0 <= g <= 5
    assert w * 3 + g * 3 <= max(cap, 0)
    if cap >= 30:
        assert (w, g) == (5, 5)


@pytest.fixture
def proposer():
    patches.apply_all()
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=16),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 100,
                                     dtype=torch.float32, get_sliding_window=lambda: None),
        device_config=SimpleNamespace(device_type="cpu"),
        scheduler_config=SimpleNamespace(max_num_seqs=4),
        additional_config={"lookahead": {"ngram": 3, "window": 3, "guesses": 2}},
    )
    return LookaheadProposer(config)


def propose(proposer, rows, extra_args=None):
    req_ids = list(rows)
    tokens = np.zeros((len(rows), 64), dtype=np.int32)
    for i, history in enumerate(rows.values()):
        tokens[i, :len(history)] = history
    lengths = np.array([len(h) for h in rows.values()], dtype=np.int32)
    proposer.bind_batch(req_ids, [True] * len(rows), trees_verified=True,
                        prompt_lens=[len(h) for h in rows.values()],
                        extra_args=extra_args or [None] * len(rows))
    return proposer.propose([[h[-1]] for h in rows.values()], lengths, tokens)


def test_tree_mode_proposes_window_and_candidates(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    drafts = propose(proposer, {"a": history})
    parents = proposer.tree_parents["a"]
    # Warm-up: one level of 3 columns, then the two continuations of 1,
    # most recent first, as a trie: (2, 5) and (2, 3) share their 2.
    assert parents == [-1, 0, 1, -1, 3, 3]
    assert drafts[0][3:] == [2, 5, 3]

    # The runtime reports the argmax at every row (root, then nodes).
    argmax = np.arange(40, 40 + len(drafts[0]) + 1)
    proposer.observe_verification(["a"], argmax, np.array([0, len(argmax)]), np.array([0]))
    assert proposer._windows["a"].filled == 2
    assert proposer._windows["a"].levels[1].tolist() == [41, 42, 43]
    drafts = propose(proposer, {"a": history})
    assert proposer.tree_parents["a"][:6] == [-1, 0, 1, 0, 1, 2]

    # Full window: the next update inserts one n-gram per column, keyed by
    # the oldest level: (level 0, level 1, argmax at level 1).
    oldest = proposer._windows["a"].levels[0].copy()
    argmax = np.arange(60, 60 + len(drafts[0]) + 1)
    proposer.observe_verification(["a"], argmax, np.array([0, len(argmax)]), np.array([0]))
    assert proposer._windows["a"].levels.tolist() == [[41, 42, 43], [64, 65, 66]]
    drafts = propose(proposer, {"a": history + [int(oldest[0])]})
    tokens, parents = drafts[0], proposer.tree_parents["a"]
    chains = {(tokens[parents[i]], tokens[i]) for i in range(6, len(tokens)) if parents[i] >= 6}
    assert (41, 64) in chains


def test_per_request_overrides(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    drafts = propose(proposer, {"a": history, "b": history, "c": history},
                     extra_args=[{"lookahead": {"disable": True}},
                                 {"lookahead": {"window": 1, "guesses": 0}},
                                 {"lookahead": {"window": "x"}}])
    assert drafts[0] == [] and "a" not in proposer.tree_parents
    assert len(drafts[1]) == 1
    assert len(drafts[2]) == 3 + 3  # the bad override is ignored


def test_budget_shrinks_trees_as_the_batch_grows(proposer):
    proposer.config = proposer.config.__class__(ngram=3, window=3, guesses=2,
                                                max_tree_tokens=12)
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    rows = {r: history for r in "abcd"}
    drafts = propose(proposer, rows)
    assert sum(len(d) for d in drafts) <= 12
    assert all(len(d) == 3 for d in drafts)


def test_no_tree_past_max_model_len(proposer):
    history = ([1, 2, 3, 4, 1, 2, 5] * 9)[:61]
    drafts = propose(proposer, {"a": history})
    assert len(drafts[0]) == 64 - 61
    assert len(proposer.tree_parents["a"]) == 3
