"""The lookahead branch without an engine: window warm-up and update, tree
layout, budget fitting, and the tree-mode proposer's bookkeeping."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import fit_costs
from vllm_lookahead import LookaheadProposer, ops
from vllm_lookahead import vllm as vllm_patches
from vllm_lookahead.proposers.budget import (BAR_SCALES, MIN_STEPS, PROBE_DRAFTS, REPROBE_STEPS,
                                             BarTuner,
                                             NodeValues, StepCostModel, nonnegative_least_squares)
from vllm_lookahead.proposers.jacobi import (JacobiWindow, fit_tree, num_classes,
                                              reference_tree_layouts, tree_layout)
from vllm_lookahead.tree.protocol import BatchInfo, DraftInputs, Drafts, Verification


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
    tokens, parents, classes = tree_layout(window, 3, candidates.tolist(), max_ranks=8)
    # Level 0 is a chain from the root; level 1 column j hangs under level 0
    # column j; candidates form a trie (7 shared).
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3]
    assert parents.tolist() == [-1, 0, 1, 0, 1, 2, -1, 6, 6, -1, 9]
    # Classes: window level * 3 + column, then 2 levels * 3 columns + rank *
    # 2 + depth of the candidate that first reaches the node.
    assert classes.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    assert classes.max() < num_classes(levels=2, columns=3, max_ranks=8)


@pytest.mark.parametrize("cap", range(0, 40))
def test_fit_tree_respects_the_cap(cap):
    w, g = fit_tree(cap, window=5, guesses=5, filled=3, cont_len=3)
    assert 0 <= w <= 5 and 0 <= g <= 5
    assert w * 3 + g * 3 <= max(cap, 0)
    if cap >= 30:
        assert (w, g) == (5, 5)


def make_proposer(**lookahead) -> LookaheadProposer:
    vllm_patches.apply_all()
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=16),
        model_config=SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 100,
                                     dtype=torch.float32, get_sliding_window=lambda: None),
        device_config=SimpleNamespace(device_type="cpu"),
        scheduler_config=SimpleNamespace(max_num_seqs=4),
        additional_config={"lookahead": {"ngram": 3, "window": 3, "guesses": 2,
                                         "budget": "static", "tune_bar": False,
                                         **lookahead}},
    )
    return LookaheadProposer(config)


@pytest.fixture
def proposer():
    """The Jacobi window and the pool alone (no recycling, no chain)."""
    return make_proposer(recycle=False, chain=0)


class Proposed(list):
    """The drafts' token lists, per row, and ``trees``: request -> parents
    of the rows that are trees."""

    def __init__(self, req_ids, drafts: Drafts):
        super().__init__(drafts.tokens)
        self.trees = {r: p for r, p in zip(req_ids, drafts.parents) if p is not None}


def propose(proposer, rows, extra_args=None, scheduled_tokens=None) -> Proposed:
    """One step of the proposer; with ``scheduled_tokens``, after a forward
    of that many tokens taking 10 ms + 1 ms per token (for the budget's
    step-time fit)."""
    if scheduled_tokens is not None:
        proposer.step_started()
        proposer.timer._forward_started -= 0.01 + 0.001 * scheduled_tokens
    req_ids = list(rows)
    tokens = np.zeros((len(rows), 64), dtype=np.int32)
    for i, history in enumerate(rows.values()):
        tokens[i, :len(history)] = history
    lengths = np.array([len(h) for h in rows.values()], dtype=np.int32)
    proposer.bind_batch(BatchInfo(req_ids, [True] * len(rows), trees_verified=True,
                                  prompt_lens=[len(h) for h in rows.values()],
                                  extra_args=extra_args or [None] * len(rows),
                                  scheduled_tokens=scheduled_tokens or 0))
    return Proposed(req_ids, proposer.draft(
        DraftInputs([[h[-1]] for h in rows.values()], lengths, tokens)))


def verification(req_id, argmax, accepted_path=()):
    """The runtime's report of one request's tree step: the target's argmax
    at its root and every node, and the accepted path."""
    path = np.full((1, max(1, len(argmax) - 1)), -1, dtype=np.int64)
    path[0, :len(accepted_path)] = accepted_path
    return Verification([req_id], np.asarray(argmax, dtype=np.int32),
                        np.array([0, len(argmax)]), np.array([len(accepted_path)]), path)


def test_tree_mode_proposes_window_and_candidates(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    drafts = propose(proposer, {"a": history})
    parents = drafts.trees["a"]
    # Warm-up: one level of 3 columns, then the two continuations of 1,
    # most recent first, as a trie: (2, 5) and (2, 3) share their 2.
    assert parents == [-1, 0, 1, -1, 3, 3]
    assert drafts[0][3:] == [2, 5, 3]

    # The runtime reports the argmax at every row (root, then nodes).
    argmax = np.arange(40, 40 + len(drafts[0]) + 1)
    proposer.observe_verification(verification("a", argmax))
    assert proposer._windows["a"].filled == 2
    assert proposer._windows["a"].levels[1].tolist() == [41, 42, 43]
    drafts = propose(proposer, {"a": history})
    assert drafts.trees["a"][:6] == [-1, 0, 1, 0, 1, 2]

    # Full window: the next update inserts one n-gram per column, keyed by
    # the oldest level: (level 0, level 1, argmax at level 1).
    oldest = proposer._windows["a"].levels[0].copy()
    argmax = np.arange(60, 60 + len(drafts[0]) + 1)
    proposer.observe_verification(verification("a", argmax))
    assert proposer._windows["a"].levels.tolist() == [[41, 42, 43], [64, 65, 66]]
    drafts = propose(proposer, {"a": history + [int(oldest[0])]})
    tokens, parents = drafts[0], drafts.trees["a"]
    chains = {(tokens[parents[i]], tokens[i]) for i in range(6, len(tokens)) if parents[i] >= 6}
    assert (41, 64) in chains


def test_chain_branch_offers_the_context_match():
    proposer = make_proposer(window=0, guesses=0, recycle=False, chain=4)
    # The longest suffix seen before (1 2, earliest at 0) and what followed it.
    drafts = propose(proposer, {"a": [1, 2, 3, 4, 1, 2]})
    assert drafts[0] == [3, 4, 1, 2] and drafts.trees["a"] == [-1, 0, 1, 2]
    # Cut by the request's room left in max_model_len (64).
    drafts = propose(proposer, {"a": list(range(2, 64)) + [2]})
    assert drafts[0] == [3] and drafts.trees["a"] == [-1]
    # No earlier occurrence of the last token: no tree.
    assert propose(proposer, {"a": [1, 2, 3]})[0] == []


def test_chain_nodes_are_classed_by_their_match_length(proposer):
    """A chain after a 2-token match and one after a 1-token match are
    priced apart: with 1-token chains never accepted and 2-token ones mostly,
    only the second is drafted."""
    proposer = make_proposer(window=0, guesses=0, recycle=False, chain=3, tune_bar=False)
    two, one = [1, 2, 3, 4, 1, 2], [5, 6, 7, 5]
    propose(proposer, {"a": two, "b": one})
    depths = np.arange(3)
    np.testing.assert_array_equal(proposer._layouts["a"][2], proposer._chain_class(0, 2, depths))
    np.testing.assert_array_equal(proposer._layouts["b"][2], proposer._chain_class(0, 1, depths))
    trained(proposer, threshold=0.3)
    proposer.values.accepted[proposer._chain_class(0, 1, depths)] = 0.0
    proposer.values.accepted[proposer._chain_class(0, 2, depths)] = 0.9e4
    drafts = propose(proposer, {"a": two, "b": one})
    assert drafts[0] == [3, 4, 1] and drafts[1] == []


def test_a_request_drafts_the_text_of_one_that_left():
    """Request "a" leaves the engine; "b" ends with tokens of "a"'s text that
    its own text does not hold before: its chain is what followed them in
    "a", classed apart from chains of its own text. With the shared text
    off, "b" has no chain."""
    history = [11, 12, 13, 14, 15, 16, 17]
    for shared, expected in ((64, [15, 16, 17]), (0, [])):
        proposer = make_proposer(window=0, guesses=0, recycle=False, chain=3, tune_bar=False,
                                 shared_text=shared)
        propose(proposer, {"a": history})
        drafts = propose(proposer, {"b": [1, 2, 12, 13, 14]})  # "a" left the batch
        assert drafts[0] == expected
        if expected:
            np.testing.assert_array_equal(proposer._layouts["b"][2],
                                          proposer._chain_class(1, 3, np.arange(3)))


def test_chain_and_recycled_nodes_share_one_trie():
    proposer = make_proposer(window=0, guesses=0, chain=3, recycle_nodes=2, recycle_ranks=2)
    proposer.successors.update(np.array([2, 3], np.int32), np.array([[3, 7], [8, 9]], np.int32))
    drafts = propose(proposer, {"a": [1, 2, 3, 4, 1, 2]})
    # The template's two recycled nodes (rank 0 after 2, rank 0 after that:
    # 3 8) and the chain 3 4 1, the 3s merged.
    tokens, parents = drafts[0], drafts.trees["a"]
    assert len(tokens) == 4
    paths = set()
    for j, t in enumerate(tokens):
        path, k = [t], parents[j]
        while k >= 0:
            path.insert(0, tokens[k])
            k = parents[k]
        paths.add(tuple(path))
    assert paths == {(3,), (3, 8), (3, 4), (3, 4, 1)}


def test_per_request_overrides(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    drafts = propose(proposer, {"a": history, "b": history, "c": history},
                     extra_args=[{"lookahead": {"disable": True}},
                                 {"lookahead": {"window": 1, "guesses": 0}},
                                 {"lookahead": {"window": "x"}}])
    assert drafts[0] == [] and "a" not in drafts.trees
    assert len(drafts[1]) == 1
    assert len(drafts[2]) == 3 + 3  # the bad override is ignored


def coordinate_descent_nnls(xtx, xty, sweeps=20000):
    """Reference: cyclic coordinate descent to convergence (coef[1:] >= 0)."""
    coef = np.zeros(len(xty))
    for _ in range(sweeps):
        for i in range(len(coef)):
            value = coef[i] + (xty[i] - xtx[i] @ coef) / xtx[i, i]
            coef[i] = value if i == 0 else max(value, 0.0)
    return coef


@pytest.mark.parametrize("seed", range(12))
def test_nonnegative_least_squares_matches_coordinate_descent(seed):
    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(40), rng.random((40, 4)) * [1, 4, 16, 60]])
    truth = rng.normal(size=5) * [1, 0.5, 0.5, 0.1, 0.05]  # some costs negative
    y = x @ truth + rng.normal(size=40) * 0.05
    xtx, xty = x.T @ x + 1e-6 * np.eye(5), x.T @ y
    got = nonnegative_least_squares(xtx, xty)
    expected = coordinate_descent_nnls(xtx, xty)
    assert (got[1:] >= 0).all()
    objective = lambda c: c @ xtx @ c - 2 * xty @ c  # noqa: E731
    assert objective(got) <= objective(expected) + 1e-9 * abs(objective(expected))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_budget_shrinks_trees_as_the_batch_grows(proposer):
    proposer.config = dataclasses.replace(proposer.config, max_tree_tokens=12)
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    rows = {r: history for r in "abcd"}
    drafts = propose(proposer, rows)
    assert sum(len(d) for d in drafts) <= 12
    assert all(len(d) == 3 for d in drafts)


def test_no_tree_past_max_model_len(proposer):
    history = ([1, 2, 3, 4, 1, 2, 5] * 9)[:61]
    drafts = propose(proposer, {"a": history})
    assert len(drafts[0]) == 64 - 61
    assert len(drafts.trees["a"]) == 3


def test_step_cost_fit_recovers_costs_and_ignores_idle_gaps():
    rng = np.random.default_rng(0)
    cost = StepCostModel()
    assert cost.threshold() == np.inf  # nothing is verified before the fit
    for step in range(200):
        n_plain, n_tree = int(rng.integers(1, 40)), int(rng.integers(0, 60)) * (step % 3 > 0)
        n_trees = int(rng.integers(1, 9)) if n_tree else 0
        forward = 0.05 + 0.01 * (n_tree > 0) + 0.003 * n_trees + 0.002 * n_plain + 0.005 * n_tree
        # 20 ms of host work around each forward; now and then the engine
        # sat idle before a step.
        cost.observe(n_plain, n_tree, n_trees, forward,
                     forward + 0.02 + 30.0 * (step % 50 == 7), produced=8)
    assert cost.ready
    # (The ridge that draws the fixed tree costs to zero, TREE_RIDGE,
    # shrinks them a few percent.)
    assert cost.node_seconds == pytest.approx(0.005, rel=1e-2)
    assert cost.tree_seconds == pytest.approx(0.003, rel=5e-2)
    assert cost.tree_step_seconds == pytest.approx(0.01, rel=0.1)
    assert cost.overhead_seconds == pytest.approx(0.02)
    # A node must be accepted more often than the tokens produced meanwhile.
    assert cost.threshold() == pytest.approx(0.005 * cost.tokens_per_second, rel=1e-2)
    assert 8 / 0.4 < cost.tokens_per_second < 8 / 0.07
    # The bar for a batch of 8 decoding requests: the fitted plain step of 8
    # tokens plus the host overhead.
    assert cost.decode_rate(8) == pytest.approx(8 / (0.05 + 8 * 0.002 + 0.02), rel=1e-2)
    assert cost.threshold(8) == pytest.approx(0.005 * cost.decode_rate(8), rel=1e-2)


def test_step_cost_fit_prices_prompt_tokens_apart():
    """Prompt chunks cost 20 ms a token, a decode step 0.3 s + 10 ms a
    request: the plain decode step of 8 requests is what decode steps say,
    not what a line through the prompt chunks says (fitted together, the
    prompts made it 50% slower, and drafts looked cheap). Before any decode
    batch but one size is seen, an unseen size costs its fixed part (fast,
    not slow), and a node is priced as the dearer of the two tokens."""
    alone = StepCostModel()
    for _ in range(6):
        alone.observe(1, 0, 0, 0.31, None, produced=1)
    assert alone.predict(8, 0, 0) == pytest.approx(0.31, rel=0.05)
    cost = StepCostModel()
    cost.observe(0, 0, 0, 0.3 + 0.02 * 1100, None, produced=1, n_prefill=1100)
    for _ in range(6):
        cost.observe(1, 0, 0, 0.31, None, produced=1)
    assert cost.predict(8, 0, 0) == pytest.approx(0.31, rel=0.05)
    assert cost.node_seconds == pytest.approx(0.02, rel=0.05)
    for step in range(40):
        n = 1 + step % 8
        prefill = 500 * (step % 10 == 0)
        cost.observe(n, 0, 0, 0.3 + 0.01 * n + 0.02 * prefill, None, produced=n,
                     n_prefill=prefill)
    assert cost.predict(8, 0, 0) == pytest.approx(0.38, rel=0.02)
    assert cost.coefficients["b_prefill"] == pytest.approx(0.02, rel=0.02)


def test_step_cost_fit_prices_nodes_past_the_knee_as_compute():
    """A forward costs its weight reads (0.3 s) until its tokens' compute
    passes them (12 tokens here), then 25 ms a token more, as a prompt token
    costs 30 ms: batch-1 tree steps of up to 10 tokens say a node costs 5 ms,
    but a batch-8 step of 8 + 54 nodes costs 30 ms a node. Fitted with one
    line through the small steps, batch 8 took its nodes at 5 ms and
    drafted full trees."""
    rng = np.random.default_rng(1)

    def forward(n_plain, n_tree, n_trees):
        n = n_plain + n_tree
        return (0.3 + 0.005 * n + 0.025 * max(n - 12, 0) + 0.01 * (n_tree > 0)
                + 0.005 * n_trees + rng.normal(0, 0.005))

    cost = StepCostModel()
    for step in range(120):
        if step % 20 == 0:  # a prompt chunk
            cost.observe(0, 0, 0, 0.3 + 0.03 * 150, None, produced=1, n_prefill=150)
            continue
        n_tree = int(rng.integers(2, 10)) * (step % 2)
        cost.observe(1, n_tree, int(n_tree > 0), forward(1, n_tree, int(n_tree > 0)), None,
                     produced=2)
    assert cost.draft_costs_known
    # Below the knee a node costs what the batch-1 steps measured...
    assert cost.nodes_seconds(1, 6) == pytest.approx(0.005, abs=0.002)
    # ... past every step seen, a prompt token's compute.
    assert cost.nodes_seconds(8, 54) > 0.025
    assert cost.threshold(8, 54) > 4 * cost.threshold(8, 1)
    # Batch-8 steps with trees of all sizes: the fit finds the knee.
    for step in range(300):
        n_tree = int(rng.integers(0, 60)) * (step % 2)
        n_trees = min(n_tree, 8)
        cost.observe(8, n_tree, n_trees, forward(8, n_tree, n_trees), None, produced=8)
    assert cost.knee in (8, 12, 16)
    assert cost.nodes_seconds(8, 54) == pytest.approx(0.005 + 0.025 * 50 / 54, rel=0.1)
    assert cost.predict(8, 54, 8) == pytest.approx(0.3 + 0.005 * 62 + 0.025 * 50 + 0.05,
                                                   rel=0.05)


def test_step_cost_fit_keeps_a_plain_step_apart_from_its_nodes():
    """Batch 1 (one token, then one token and a chain of 8 nodes), then
    batch 8 seen only with trees of 48-60 nodes, past the knee: neither
    tells a plain token's cost apart by its steps alone (from the fixed
    cost at batch 1, from the nodes at batch 8). With a plain token and a
    node fitted apart, the batch-8 steps' compute went to the plain tokens
    (40-76 ms each instead of 2 ms on Qwen 1.5B), a plain step of 8 looked
    several times slower than it is, the bar fell with it, and full trees
    that did not pay were drafted."""
    rng = np.random.default_rng(2)

    def forward(n_plain, n_tree, n_trees, noise=0.05):
        n = n_plain + n_tree
        return ((0.15 + 0.002 * n + 0.025 * max(n - 8, 0) + 0.01 * (n_tree > 0)
                 + 0.003 * n_trees) * (1 + rng.normal(0, noise)))

    cost = StepCostModel()
    cost.observe(0, 0, 0, 0.15 + 0.03 * 150, None, produced=1, n_prefill=150)
    for step in range(60):
        n_tree = 8 * (step % 2)  # full chains of 8
        cost.observe(1, n_tree, int(n_tree > 0), forward(1, n_tree, int(n_tree > 0)), None,
                     produced=1 + n_tree // 2)
    for _ in range(12):
        n_tree = int(rng.integers(48, 61))
        cost.observe(8, n_tree, 8, forward(8, n_tree, 8), None, produced=40)
    # (Fitted apart: a plain step of 8 at 53 tokens/s instead of 48 here;
    # with other noise, a = 0.004 s, b_plain = 0.137 s and 7 tokens/s.)
    assert cost.coefficients["b_plain"] < 0.005
    assert cost.decode_rate(8) == pytest.approx(8 / forward(8, 0, 0, 0), rel=0.1)
    # A batch-8 tree of 56 nodes is priced at about what it costs.
    extra = cost.predict(8, 56, 8) - cost.predict(8, 0, 0)
    assert extra == pytest.approx(forward(8, 56, 8, 0) - forward(8, 0, 0, 0), rel=0.1)


def test_step_cost_fit_remembers_tree_costs_while_no_tree_runs():
    cost = StepCostModel()
    for step in range(200):
        n_tree = 8 * (step % 2)
        cost.observe(4, n_tree, 4 if n_tree else 0,
                     0.05 + 0.07 * (n_tree > 0) + 0.002 * 4 + 0.004 * n_tree, None, produced=4)
    extra = lambda: cost.predict(4, 8, 4) - cost.predict(4, 0, 0)  # noqa: E731
    assert extra() == pytest.approx(0.07 + 0.004 * 8, rel=1e-2)
    # A stretch without trees: what a tree step costs is not forgotten...
    for step in range(REPROBE_STEPS - 1):
        n_plain = 2 + step % 5  # the plain token's cost is identified
        cost.observe(n_plain, 0, 0, 0.05 + 0.002 * n_plain, None, produced=4)
    assert cost.draft_costs_known
    assert extra() == pytest.approx(0.07 + 0.004 * 8, rel=1e-2)
    # ... until it is long enough that the costs are probed again: a node is
    # then priced as a plain token, no fixed cost, until trees measure it.
    cost.observe(5, 0, 0, 0.05 + 0.002 * 5, None, produced=4)
    assert not cost.draft_costs_known
    assert cost.node_seconds == pytest.approx(0.002, rel=1e-2)
    assert cost.tree_seconds == cost.tree_step_seconds == 0.0


def test_step_cost_fit_leaves_the_first_draft_step_out():
    """The first step with drafts (the runtime's self-check) is far slower
    than any later one; fitting it priced nodes out for good."""
    cost = StepCostModel()
    cost.observe(125, 0, 0, 0.1, None, produced=1)  # prefill
    for _ in range(6):
        cost.observe(1, 0, 0, 0.025, None, produced=1)
    cost.observe(1, 3, 1, 0.135, None, produced=2)  # self-check step
    assert not cost.draft_costs_known
    assert cost.threshold(1) < 0.05  # a node still priced as a plain token
    for step in range(12):
        n_tree = 4 + step % 5
        cost.observe(1, n_tree, 1, 0.025 + 0.003 + 0.0006 * n_tree, None, produced=2)
    assert cost.draft_costs_known
    assert cost.node_seconds == pytest.approx(0.0006, rel=0.2)


def test_node_values_learn_rates_and_reexplore_cut_classes():
    values = NodeValues(3)
    assert (values.estimate() > 0.6).all()  # untried classes are tried first
    for _ in range(300):
        values.update(np.array([0, 0, 1, 1]), np.array([0, 0, 1]))
    assert values.rate()[0] > 0.95 and 0.45 < values.rate()[1] < 0.55
    assert values.estimate()[2] > values.estimate()[1] > values.rate()[1]
    # Class 1 is no longer verified: its bonus grows back.
    before = values.estimate()[1]
    for _ in range(2000):
        values.update(np.array([0]), np.array([0]))
    assert values.estimate()[1] > before + 0.1


def trained(proposer, threshold, tree_step_tokens=0.0, window_rate=0.05, candidate_rate=0.9,
            tree_tokens=0.0):
    """The proposer with a fitted measured budget: the given acceptance
    threshold, fixed tree-step and per-tree costs (in tokens), window nodes
    accepted at ``window_rate``, candidates' first nodes at
    ``candidate_rate`` and their second nodes never."""
    proposer.config = dataclasses.replace(proposer.config, budget="measured")
    fit_costs(proposer.cost, threshold, tree_step_tokens, tree_tokens)
    values = proposer.values
    levels, window = proposer.config.ngram - 1, proposer.config.window
    values.offered[:] = 1e4
    values.accepted[:levels * window] = 1e4 * window_rate
    first = levels * window + np.arange(8) * levels
    values.accepted[first] = 1e4 * candidate_rate
    values.accepted[first + 1] = 0.0
    return proposer


def test_measured_budget_verifies_no_tree_until_it_knows_a_plain_step(proposer):
    proposer.config = dataclasses.replace(proposer.config, budget="measured")
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    # A prefill, then plain decode steps: no tree while the fit is not ready.
    for scheduled in [40] + [1] * (MIN_STEPS - 2):
        drafts = propose(proposer, {"a": history}, scheduled_tokens=scheduled)
        assert drafts == [[]] and drafts.trees == {}
    # Those steps gave the cost of a token, and a node is assumed to cost as
    # much: at batch 1 the whole tree of untried (optimistically valued)
    # classes clears that bar.
    drafts = propose(proposer, {"a": history}, scheduled_tokens=1)
    assert proposer.cost.ready and 0 < proposer._threshold < 0.5
    assert len(drafts[0]) == 6
    # What trees cost is not measured yet: at most PROBE_DRAFTS of them a step.
    drafts = propose(proposer, dict.fromkeys("abcd", history), scheduled_tokens=7)
    assert sum(1 for d in drafts if d) == PROBE_DRAFTS == len(drafts.trees)


def test_measured_budget_keeps_only_nodes_that_pay(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    trained(proposer, threshold=0.02)
    drafts = propose(proposer, {"a": history})
    # Window columns (5%) pay at a low threshold, second candidate tokens
    # (never accepted) do not: 3 window nodes, then the candidates' shared 2.
    assert drafts[0][3:] == [2] and drafts.trees["a"] == [-1, 0, 1, -1]
    trained(proposer, threshold=0.3)
    drafts = propose(proposer, {"a": history})
    # Window columns (5%) are cut; the two candidates keep their first token
    # (90%), shared by both: 2.
    assert drafts[0] == [2] and drafts.trees["a"] == [-1]
    trained(proposer, threshold=0.95)
    drafts = propose(proposer, {"a": history})
    assert drafts == [[]] and "a" not in drafts.trees


def test_measured_budget_drops_trees_that_do_not_cover_the_step_cost(proposer):
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    trained(proposer, threshold=0.3, tree_step_tokens=0.5)
    assert propose(proposer, {"a": history}) == [[2]]  # gain 0.9 - 0.3 > 0.5
    trained(proposer, threshold=0.3, tree_step_tokens=0.7)
    drafts = propose(proposer, {"a": history})
    assert drafts == [[]] and drafts.trees == {}


def test_measured_budget_drops_trees_that_do_not_cover_their_own_cost(proposer):
    # "a" repeats itself (a candidate accepted 90% of the time), "b" does not
    # (only window nodes, 5%): at 0.02 per node "b"'s tree gains 3 x 0.03.
    rows = {"a": [1, 2, 3, 4, 1, 2, 5, 1], "b": [7, 8, 9, 10, 11, 12]}
    trained(proposer, threshold=0.02, tree_tokens=0.05)
    drafts = propose(proposer, rows)
    assert len(drafts[0]) == 4 and len(drafts[1]) == 3
    trained(proposer, threshold=0.02, tree_tokens=0.5)
    drafts = propose(proposer, rows)
    assert len(drafts[0]) == 4 and drafts[1] == []
    assert set(drafts.trees) == {"a"}


def test_node_values_shrink_a_rarely_offered_class_to_the_pooled_rate():
    values = NodeValues(3)
    for _ in range(200):  # class 0 verified every step, accepted 1 in 20
        values.update(np.array([0]), np.array([0]) if values.offered[0] % 20 < 1 else
                      np.zeros(0, np.int64))
    values.update(np.array([1]), np.zeros(0, np.int64))  # class 1 once, rejected
    pooled = values.accepted.sum() / values.offered.sum()
    assert 0.02 < pooled < 0.1
    # Near the pooled rate, not at a prior of one half (0.25 after one
    # rejection, which kept such classes in every tree).
    assert values.rate()[1] < pooled and values.rate()[2] < 0.1
    assert values.estimate()[2] > values.rate()[0]  # still tried first


def test_a_budget_that_cut_every_class_drafts_again():
    """Every class learned below the bar: no tree. Steps that verify nothing
    still age the counts, so the estimates drift back and trees are tried
    again (aged only on verifications, such an engine never drafted again)."""
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    trained(trained_proposer := make_proposer(recycle=False, chain=0), threshold=0.3,
            window_rate=0.05, candidate_rate=0.1)
    steps = 0
    while propose(trained_proposer, {"a": history}) == [[]]:
        steps += 1
        assert steps < 2000, "the budget never drafted again"
    assert steps > 10  # not at once: the learned rates hold for a while


def tuned(reward, steps: int, seed: int = 0, noise: float = 0.5) -> BarTuner:
    """A tuner after ``steps`` steps whose realized throughput over a plain
    step's is ``reward(scale)`` times 1 - noise, 1 or 1 + noise (a batch-1
    step's tokens vary that much; a batch's less)."""
    tuner = BarTuner(seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        scale = tuner.choose()
        tuner.observe(reward(scale) * rng.choice([1 - noise, 1.0, 1 + noise]))
    return tuner


@pytest.mark.parametrize("seed", range(3))
def test_bar_tuner_walks_to_the_scale_that_pays_most(seed):
    # Drafts pay most at twice the bar (a budget pricing nodes too cheap).
    peak = lambda scale: 1.0 if np.isinf(scale) else 1.3 - 0.2 * abs(np.log2(scale) - 1.0)
    assert tuned(peak, 3000, seed).best_scale == 2.0


@pytest.mark.parametrize("seed", range(5))
def test_bar_tuner_stops_drafting_within_a_short_load(seed):
    """Drafts lose 8% at every scale: a batch's load of 300 steps ends at no
    drafts."""
    losing = lambda scale: 1.0 if np.isinf(scale) else 0.92
    assert np.isinf(tuned(losing, 300, seed, noise=0.1).best_scale)


@pytest.mark.parametrize("seed", range(3))
def test_bar_tuner_stops_drafting_where_no_draft_pays(seed):
    """Every scale realizes less than a plain step (host time the fit does
    not see): the bar walks up to drafting nothing."""
    losing = lambda scale: 1.0 if np.isinf(scale) else 0.85 + 0.02 * np.log2(scale)
    assert np.isinf(tuned(losing, 3000, seed).best_scale)


def test_bar_tuner_credits_only_the_step_it_chose_for():
    tuner = BarTuner()
    tuner.choose()
    tuner.observe(None)  # a prompt step: not measured, credited to no scale
    tuner.observe(5.0)  # a step without a choice of scale
    assert tuner._count.sum() == 0
    tuner.choose()
    tuner.observe(1.0)
    assert tuner._count.sum() == 1


def test_tuner_scale_reaches_the_proposer_bar():
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    proposer = trained(make_proposer(recycle=False, chain=0, tune_bar=True), threshold=0.02)
    tuner = proposer.tuner
    tuner._best, tuner._explore = BAR_SCALES.index(np.inf), 0.0
    assert propose(proposer, {"a": history}) == [[]] and np.isinf(proposer._threshold)
    tuner._best = BAR_SCALES.index(4.0)
    propose(proposer, {"a": history})
    assert proposer._threshold == pytest.approx(0.08)
    # Until drafts' costs are measured (the probing steps), the bar as priced.
    proposer.cost._tree_costs = None
    propose(proposer, {"a": history})
    assert proposer._scale == 1.0


def sized(proposer, seconds: dict[int, float]):
    """Forward seconds measured for decode steps of these sizes (tokens)."""
    for size, t in seconds.items():
        proposer.cost._size_seconds[size] = t
        proposer.cost._size_weight[size] = 1.0
    return proposer


def test_measured_budget_prices_a_tree_by_the_step_size_it_makes(proposer):
    """At 100 tok/s, steps of 1-4 tokens measured at 10 ms and of 5 at
    30 ms (2 tokens' time): of the tree the line keeps (3 window nodes at
    5%, the candidates' shared first token at 90%: 5 tokens), the step of 4
    keeps the candidate and two window nodes, and the window, cut short,
    is not advanced."""
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    trained(proposer, threshold=0.02)
    sized(proposer, {1: 0.01, 4: 0.01, 5: 0.03})
    drafts = propose(proposer, {"a": history})
    assert drafts.trees["a"] == [-1, 0, -1] and drafts[0][2] == 2
    w, _, classes = proposer._layouts["a"]
    assert w == 0 and len(classes) == 3
    # Measured free up to 5 tokens: the whole tree, window kept whole.
    sized(proposer, {5: 0.01, 6: 0.03})
    drafts = propose(proposer, {"a": history})
    assert drafts[0][3:] == [2] and drafts.trees["a"] == [-1, 0, 1, -1]
    assert proposer._layouts["a"][0] == proposer.config.window


def test_measured_budget_drafts_a_free_node_the_line_prices_out(proposer):
    """The fitted line puts a 0.7-token fixed cost on any tree step, which
    no tree here covers; a step of 2 tokens was measured as fast as one of
    1, so the best node is drafted alone."""
    history = [1, 2, 3, 4, 1, 2, 5, 1]
    trained(proposer, threshold=0.3, tree_step_tokens=0.7)
    assert propose(proposer, {"a": history}) == [[]]
    sized(proposer, {1: 0.01, 2: 0.01, 3: 0.02})
    drafts = propose(proposer, {"a": history})
    assert drafts == [[2]] and drafts.trees["a"] == [-1]


def test_step_cost_by_size_interpolates_and_forgets():
    cost = StepCostModel()
    for step in range(40):
        size = (1, 3, 8)[step % 3]
        cost.observe(1, size - 1, int(size > 1), 0.1 + 0.03 * (size >= 8), None, produced=1)
    cost.observe(0, 0, 0, 5.0, None, produced=1, n_prefill=3)  # prompts stay out
    got = cost.decode_seconds(1, np.arange(12), np.ones(12))
    np.testing.assert_allclose(got[:7], 0.1, rtol=1e-9)  # sizes 1-7: as 1 and 3
    np.testing.assert_allclose(got[7], 0.13, rtol=1e-9)
    # Past every size seen: the fit's, never below what was seen.
    model = cost.predict(1, 11, 1)
    assert got[11] == pytest.approx(max(model, 0.13))
    # Size 8 not seen for a while (its weight decayed below SIZE_MIN_WEIGHT):
    # forgotten, priced as 3 (tried again).
    for _ in range(1000):
        cost.observe(1, 2, 1, 0.1, None, produced=1)
    assert cost.decode_seconds(1, np.array([7]), np.ones(1))[0] == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(40))
def test_compiled_tree_layout_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi, shape):
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int32)

    batch, levels, width = (int(randint(lo, hi, ())) for lo, hi in ((1, 12), (1, 4), (1, 5)))
    guesses, cont_len = int(randint(0, 6, ())), int(randint(1, levels, ()))
    # A small vocabulary, so candidates share prefixes and the trie merges them.
    args = (randint(0, 3, (batch, levels, width)), randint(1, levels, (batch,)),
            randint(0, width, (batch,)), randint(0, 3, (batch, guesses, cont_len)),
            randint(0, cont_len, (batch, guesses)),
            randint(0, levels * width + guesses * cont_len + 2, (batch,)))
    max_ranks = int(randint(1, 4, ()))
    # A recycled tree on half the seeds (random template, some nodes absent).
    template = int(randint(1, 10, ())) if seed % 2 else 0
    template_parents = torch.tensor([int(randint(-1, j - 1, ())) for j in range(template)],
                                    dtype=torch.int32)
    recycled = torch.where(randint(0, 4, (batch, template)) == 0, -1,
                           randint(0, 3, (batch, template)))
    got = ops.lookahead_tree_layout(*args, max_ranks, recycled, template_parents)
    want = reference_tree_layouts(*args, max_ranks, recycled, template_parents)
    for name, g, w in zip(("tokens", "parents", "classes", "num_nodes", "columns"), got, want):
        assert torch.equal(g, w), name
    assert (got[3] <= args[5]).all()


def test_compiled_tree_layout_rejects_bad_input():
    grids = torch.zeros(2, 2, 3, dtype=torch.int32)
    ok = dict(filled=torch.ones(2, dtype=torch.int32),
              columns=torch.full((2,), 3, dtype=torch.int32),
              candidates=torch.zeros(2, 1, 2, dtype=torch.int32),
              candidate_lens=torch.ones(2, 1, dtype=torch.int32),
              caps=torch.full((2,), 9, dtype=torch.int32))
    ops.lookahead_tree_layout(grids, *ok.values(), 8)
    for key, bad, match in (("filled", torch.zeros(2, dtype=torch.int32), "filled"),
                            ("columns", torch.full((2,), 4, dtype=torch.int32), "columns"),
                            ("candidate_lens", torch.full((2, 1), 3, dtype=torch.int32),
                             "candidate length"),
                            ("caps", torch.ones(2, dtype=torch.int64), "caps")):
        with pytest.raises(ValueError, match=match):
            ops.lookahead_tree_layout(grids, *{**ok, key: bad}.values(), 8)
