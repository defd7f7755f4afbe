"""The cross-request text index: matches against a brute-force reference,
segments never run into each other, the ring forgets old text, memory is
fixed."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_lookahead.proposers.shared_text import SEPARATOR, SharedText


def reference_match(segments: list[list[int]], capacity: int, context: list[int],
                    length: int, max_ngram: int = 4) -> tuple[list[int], int]:
    """The ring's text (the last ``capacity`` tokens, separators included),
    the longest suffix of ``context`` (at most ``max_ngram`` tokens) in it
    and what followed its latest occurrence, up to the segment's end."""
    ring = []
    for segment in filter(None, segments):
        ring += segment[-(capacity - 1):] + [SEPARATOR]
    ring = ring[-capacity:]
    for size in range(min(max_ngram, len(context)), 0, -1):
        suffix = context[-size:]
        for end in range(len(ring) - 1, size - 2, -1):
            if ring[end - size + 1:end + 1] == suffix:
                follow = []
                for token in ring[end + 1:end + 1 + length]:
                    if token == SEPARATOR:
                        break
                    follow.append(token)
                return follow, size
    return [], 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=12), max_size=6),
       st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(1, 5),
       st.sampled_from([8, 16, 64]))
def test_match_is_the_latest_longest_occurrence(segments, context, length, capacity):
    text = SharedText(capacity)
    for segment in segments:
        text.add(np.asarray(segment, np.int32))
    got, size = text.match(np.asarray(context, np.int32), length)
    expected, expected_size = reference_match(segments, capacity, context, length)
    # The table is direct-mapped: an n-gram whose slot a later one took is
    # not found (a shorter match may be). What is found is always right.
    assert size <= expected_size
    if size < expected_size:
        expected = (reference_match(segments, capacity, context, length, max_ngram=size)[0]
                    if size else [])
    assert got.tolist() == expected + [-1] * (length - len(expected))


def test_a_repeated_request_finds_its_whole_earlier_text():
    rng = np.random.default_rng(0)
    text = SharedText(capacity=4096)
    earlier = rng.integers(0, 50_000, 500).astype(np.int32)
    text.add(earlier)
    for _ in range(5):
        text.add(rng.integers(0, 50_000, 300).astype(np.int32))
    sizes = []
    for end in range(4, 490):
        follow, size = text.match(earlier[:end], 8)
        assert follow.tolist() == earlier[end:end + 8].tolist()
        sizes.append(size)
    # Some n-grams lost their slot to later ones (direct-mapped, 2,000
    # tokens' n-grams in 32,768 slots): a shorter suffix matched there, with
    # the same continuation.
    assert np.mean(np.array(sizes) == 4) > 0.7 and min(sizes) >= 1


def test_continuation_stops_at_the_segment_end_and_old_text_is_forgotten():
    text = SharedText(capacity=16)
    text.add(np.array([1, 2, 3, 4]))
    text.add(np.array([7, 8]))
    assert text.match(np.array([9, 2]), 4)[0].tolist() == [3, 4, -1, -1]
    follow, size = text.match(np.array([4]), 3)
    assert size == 1 and follow.tolist() == [-1, -1, -1]  # 4 ended its segment
    for _ in range(4):  # 20 more tokens: [1 2 3 4] is out of the ring
        text.add(np.array([5, 6, 7, 8]))
    assert text.match(np.array([2]), 2)[1] == 0
    assert text.nbytes() == 16 * 4 + 16 * 8 * 16
