"""The compiled n-gram pool against its pure-Python reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.ops import PoolState, ngram_pool_insert, ngram_pool_lookup
from vllm_lookahead.proposers.pool import NgramPool
from vllm_lookahead.reference import ngram_pool_insert as reference_ngram_pool_insert
from vllm_lookahead.reference import ngram_pool_lookup as reference_ngram_pool_lookup


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


@st.composite
def pool_streams(draw):
    """A small pool geometry plus a stream of insert/lookup batches over a
    tiny vocabulary, so keys collide, sets fill up and entries get evicted."""
    ways = draw(st.sampled_from([1, 2, 4]))
    geometry = dict(
        num_slots=draw(st.integers(1, 4)),
        buckets=ways * draw(st.sampled_from([1, 2, 4])),
        ways=ways,
        key_len=draw(st.integers(1, 2)),
        capacity=draw(st.integers(1, 4)),
        cont_len=draw(st.integers(1, 3)),
    )
    vocab = draw(st.integers(2, 12))
    shared = draw(st.booleans())
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        n_rows = draw(st.integers(1, 4))
        width = draw(st.integers(1, 24))
        tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n_rows * width,
                               max_size=n_rows * width))
        rows, starts, ends = [], [], []
        for _ in range(n_rows):
            rows.append(draw(st.integers(0, n_rows - 1)))
            start = draw(st.integers(0, width - 1))
            starts.append(start)
            ends.append(draw(st.integers(start + 1, width)))
        slots = [draw(st.integers(0, geometry["num_slots"] - 1)) for _ in range(n_rows)]
        queries = draw(st.lists(st.integers(0, vocab - 1),
                                min_size=n_rows * geometry["key_len"],
                                max_size=n_rows * geometry["key_len"]))
        ops.append((slots, np.array(tokens).reshape(n_rows, width), rows, starts,
                    ends, queries, draw(st.integers(0, 6))))
    return geometry, vocab, shared, ops


@settings(max_examples=300, deadline=None)
@given(pool_streams())
def test_pool_matches_reference(stream):
    geometry, vocab, shared, ops = stream
    state = PoolState.allocate(**geometry)
    ref = state.clone()
    shared_slot = geometry["num_slots"] - 1 if shared else -1
    for slots, tokens, rows, starts, ends, queries, guesses in ops:
        args = (i32(slots), torch.from_numpy(tokens.astype(np.int32)), i32(rows),
                i32(starts), i32(ends), vocab, shared_slot)
        ngram_pool_insert(state, *args)
        reference_ngram_pool_insert(ref, *args)
        for got, want in zip(state.tensors(), ref.tensors()):
            assert torch.equal(got, want)
        query = i32(queries).reshape(len(slots), geometry["key_len"])
        got = ngram_pool_lookup(state, i32(slots), query, guesses, shared_slot)
        want = reference_ngram_pool_lookup(ref, i32(slots), query, guesses, shared_slot)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_lookup_most_recent_first_and_deduplicated():
    pool = NgramPool(max_requests=2, vocab_size=100, ngram=3, capacity=4)
    pool.open("a")
    span = np.array([[5, 1, 2, 5, 3, 4, 5, 1, 2]], dtype=np.int32)
    pool.insert_spans(["a"], torch.from_numpy(span), [0], [0], [9])
    out, counts = pool.lookup(["a"], i32([[5]]), 8)
    assert counts.tolist() == [2]
    assert out[0, :2].tolist() == [[1, 2], [3, 4]]


def test_shared_pool_is_consulted_after_own_pool():
    pool = NgramPool(max_requests=2, vocab_size=100, ngram=2, shared=True)
    pool.open("a")
    pool.open("b")
    pool.insert_ngrams(["a"], i32([[7, 8]]))
    pool.insert_ngrams(["b"], i32([[7, 9]]))
    out, counts = pool.lookup(["b"], i32([[7]]), 4)
    assert counts.tolist() == [2]
    assert out[0, :2, 0].tolist() == [9, 8]


def test_memory_is_bounded_under_a_long_stream():
    pool = NgramPool(max_requests=1, vocab_size=50_000, ngram=4, buckets=64, ways=4,
                     capacity=2)
    before = pool.nbytes()
    pool.open("r")
    tokens = torch.randint(0, 50_000, (1, 20_000), dtype=torch.int32)
    pool.insert_spans(["r"], tokens, [0], [0], [20_000])
    assert pool.nbytes() == before
    assert int((pool.state.keys[0, :, 0] >= 0).sum()) == 64
    # The most recent n-gram survives eviction.
    last = tokens[0, -4:]
    out, counts = pool.lookup(["r"], last[:1].reshape(1, 1), 2)
    assert counts.item() >= 1 and out[0, 0].tolist() == last[1:].tolist()


def test_erase_frees_the_slot_and_forgets_the_request():
    pool = NgramPool(max_requests=1, vocab_size=10, ngram=2)
    pool.open("a")
    pool.insert_ngrams(["a"], i32([[1, 2]]))
    pool.erase("a")
    assert "a" not in pool
    pool.open("b")
    out, counts = pool.lookup(["b"], i32([[1]]), 1)
    assert counts.tolist() == [0]


@pytest.mark.parametrize(
    "tokens, start, end, match",
    [
        ([[1, -3, 2]], 0, 3, "outside the vocabulary"),
        ([[1, 10, 2]], 0, 3, "outside the vocabulary"),
        ([[1, 2, 3]], 1, 1, "empty"),
        ([[1, 2, 3]], 0, 4, "outside the token rows"),
    ],
)
def test_bad_spans_raise_value_error(tokens, start, end, match):
    pool = NgramPool(max_requests=1, vocab_size=10, ngram=2)
    pool.open("a")
    before = pool.state.clone()
    with pytest.raises(ValueError, match=match):
        pool.insert_spans(["a"], i32(tokens), [0], [start], [end])
    for got, want in zip(pool.state.tensors(), before.tensors()):
        assert torch.equal(got, want)


def test_bad_requests_and_geometry_raise():
    with pytest.raises(ValueError, match="ngram"):
        NgramPool(max_requests=1, vocab_size=10, ngram=1)
    pool = NgramPool(max_requests=1, vocab_size=10, ngram=2)
    with pytest.raises(KeyError, match="unknown request"):
        pool.lookup(["nobody"], i32([[1]]), 1)
    with pytest.raises(KeyError, match="unknown request"):
        pool.erase("nobody")
    pool.open("a")
    with pytest.raises(RuntimeError, match="in use"):
        pool.open("b")
    with pytest.raises(ValueError, match="slot out of range"):
        ngram_pool_lookup(pool.state, i32([5]), i32([[1]]), 1)
    with pytest.raises(ValueError, match="must be Int"):
        ngram_pool_lookup(pool.state, i32([0]), torch.tensor([[1]]), 1)
