"""LookaheadProposer on synthetic batches, without an engine: per-request
state must follow request ids across row reordering and be freed when a
request leaves the batch."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import batch_info, fit_costs
from vllm_lookahead import LookaheadProposer
from vllm_lookahead import vllm as vllm_patches


@pytest.fixture(autouse=True)
def plugin_applied():
    vllm_patches.apply_all()


def make_proposer(k=4, max_num_seqs=4, max_model_len=64, **lookahead):
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_model_len,
                                     get_vocab_size=lambda: 100),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        additional_config={"lookahead": {"mode": "linear", "ngram": 3, "key_len": 1,
                                         "budget": "static", "tune_bar": False,
                                         **lookahead}},
    )
    return LookaheadProposer(config)


def step(proposer, rows: dict[str, list[int]], max_model_len=64, accepted=None):
    """One propose call with request -> token history per row, in order;
    ``accepted[i]``: draft tokens vLLM accepted for row i last step."""
    req_ids = list(rows)
    tokens = np.zeros((len(rows), max_model_len), dtype=np.int32)
    for i, history in enumerate(rows.values()):
        tokens[i, : len(history)] = history
    lengths = np.array([len(h) for h in rows.values()], dtype=np.int32)
    proposer.bind_batch(batch_info(req_ids))
    accepted = accepted or [0] * len(rows)
    sampled = [[h[-1]] * (1 + a) for h, a in zip(rows.values(), accepted)]
    return proposer.propose(sampled, lengths, tokens)


def test_chain_is_extended_through_the_pool():
    proposer = make_proposer(k=6)
    # 1 -> (2, 3); 3 -> (4, 5); 5 -> (6, 7)
    drafts = step(proposer, {"a": [1, 2, 3, 4, 5, 6, 7, 9, 1]})
    assert drafts == [[2, 3, 4, 5, 6, 7]]


def test_state_follows_requests_across_row_swaps():
    proposer = make_proposer(k=2, adaptive=False)
    a, b = [10, 11, 12, 10], [20, 21, 22, 20]
    assert step(proposer, {"a": a, "b": b}) == [[11, 12], [21, 22]]
    # Rows swapped and one token appended to each: the pools stay with ids.
    a2, b2 = a + [11, 12, 10], b + [21, 22, 20]
    assert step(proposer, {"b": b2, "a": a2}) == [[21, 22], [11, 12]]


def test_adaptive_draft_length_follows_acceptance():
    proposer = make_proposer(k=8)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1] * 2
    assert len(step(proposer, {"a": history})[0]) == 8
    # 3 of 8 accepted: next draft is 4 tokens.
    assert len(step(proposer, {"a": history}, accepted=[3])[0]) == 4
    # All 4 accepted: allowed to double (up to k).
    assert len(step(proposer, {"a": history}, accepted=[4])[0]) == 8
    # Nothing accepted: a single probing token.
    assert len(step(proposer, {"a": history}, accepted=[0])[0]) == 1


def test_measured_budget_cuts_chains_where_they_stop_paying():
    proposer = make_proposer(k=8, budget="measured", adaptive=False)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1] * 2
    assert step(proposer, {"a": history}) == [[]]  # nothing before the fit
    # Depths 0-1 accepted 90% of the time, deeper ones 5%; a node needs 30%.
    fit_costs(proposer.cost, threshold=0.3)
    for _ in range(300):
        proposer.chain_values.update(np.arange(8), np.arange(2))
        proposer.chain_values.update(np.arange(8), np.arange(0))
    assert step(proposer, {"a": history, "b": history[:6]}) == [[2, 3], []]
    # A request's draft must also pay for its own fixed cost (gain 2 x 0.15
    # here), and the step's drafts for that of a drafting step.
    fit_costs(proposer.cost, threshold=0.3, draft_tokens=0.5)
    assert step(proposer, {"a": history}) == [[]]
    fit_costs(proposer.cost, threshold=0.3, step_tokens=0.5)
    assert step(proposer, {"a": history}) == [[]]
    fit_costs(proposer.cost, threshold=0.3, step_tokens=0.1, draft_tokens=0.1)
    assert step(proposer, {"a": history}) == [[2, 3]]


def test_no_pool_work_while_the_budget_drafts_nothing():
    proposer = make_proposer(k=4, budget="measured")
    history = [1, 2, 3, 4, 5, 1]
    assert step(proposer, {"a": history, "b": [7, 8, 9]}) == [[], []]
    assert len(proposer.pool) == 0 and proposer._indexed == {}
    # Drafting resumes: the pool catches up on the whole history at once.
    fit_costs(proposer.cost, threshold=0.01)
    assert step(proposer, {"a": history + [2, 3]}) == [[4, 5, 1, 2]]
    assert set(proposer._indexed) == {"a"} and proposer._allowed.keys() == {"a"}


def test_chain_acceptance_is_measured_per_depth():
    proposer = make_proposer(k=4, adaptive=False)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1] * 2
    step(proposer, {"a": history})
    step(proposer, {"a": history}, accepted=[2])
    assert proposer.chain_values.offered.tolist() == [1, 1, 1, 1]
    assert proposer.chain_values.accepted.tolist() == [1, 1, 0, 0]


def test_pools_of_departed_requests_are_freed():
    proposer = make_proposer(max_num_seqs=2)
    step(proposer, {"a": [1, 2, 3, 1], "b": [4, 5, 6, 4]})
    step(proposer, {"c": [7, 8, 9, 7], "d": [1, 1, 1, 1]})
    assert set(proposer._indexed) == {"c", "d"}
    assert len(proposer.pool) == 2


def test_no_draft_past_max_model_len():
    proposer = make_proposer(k=8, max_model_len=8)
    assert step(proposer, {"a": [1, 2, 3, 1, 2, 3, 1]}, max_model_len=8) == [[2]]


def test_propose_without_the_model_runner_patch_fails_clearly():
    proposer = make_proposer()
    with pytest.raises(RuntimeError, match="request ids"):
        proposer.propose([[1]], np.array([1], dtype=np.int32),
                         np.zeros((1, 8), dtype=np.int32))
