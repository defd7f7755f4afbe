"""Text shared across requests: where a request's own text has no good
context match, the text of earlier requests may (the same prompt asked
again, a code base edited over many requests, a system prompt's answers).

:class:`SharedText` keeps the last ``capacity`` tokens of the requests that
left the engine (prompt and output, one segment each) in a ring, and a
direct-mapped hash table from every 1..``CHAIN_MAX_NGRAM``-gram of the ring
to the position where it last ended. A lookup hashes the request's last
tokens, checks the ring really holds them there (a slot is overwritten by
any later n-gram of the same hash, and ring positions by newer text), and
returns what followed, up to the end of that segment: vLLM ``suffix``'s idea
(a cross-request index) with the chain's match rule.

Memory, fixed at start: ``capacity * 4`` bytes of ring and ``capacity *
TABLE_SLOTS_PER_TOKEN * 16`` bytes of table (65,536 tokens: 8.25 MiB).
"""

from __future__ import annotations

import numpy as np

from vllm_lookahead.proposers.recycle import CHAIN_MAX_NGRAM

# Table slots per ring token (one n-gram of each length ends at a token:
# at most half the slots are live, so a few percent of a request's n-grams
# lose their slot to later ones).
TABLE_SLOTS_PER_TOKEN = 8
# Ring token between segments (no match or continuation crosses it).
SEPARATOR = -1
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_MASK_63 = np.uint64((1 << 63) - 1)


def ngram_hashes(tokens: np.ndarray, size: int) -> np.ndarray:
    """uint64 hash of the ``size``-gram ending at each position of
    ``tokens`` from ``size - 1`` on (a polynomial hash, the length mixed in,
    so that n-grams of different lengths do not share hashes)."""
    tokens = np.asarray(tokens, dtype=np.int64).astype(np.uint64)
    count = len(tokens) - size + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.full(count, np.uint64(size), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(size):
            h = (h * _MULTIPLIER + tokens[k:k + count] + np.uint64(1)) & _MASK_63
        return (h ^ (h >> np.uint64(29))) * _MULTIPLIER & _MASK_63


def ngram_hash(tokens: list[int]) -> int:
    """:func:`ngram_hashes` of one n-gram, in Python integers (a lookup
    hashes a few tokens: numpy's per-call cost would dominate)."""
    h = len(tokens)
    for token in tokens:
        h = (h * _M + token + 1) & _M63
    return ((h ^ (h >> 29)) * _M) & _M63


_M, _M63 = int(_MULTIPLIER), int(_MASK_63)


class SharedText:
    """Ring of recent requests' text with an n-gram index (module doc)."""

    def __init__(self, capacity: int, max_ngram: int = CHAIN_MAX_NGRAM):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.max_ngram = max_ngram
        self.ring = np.full(capacity, SEPARATOR, dtype=np.int32)
        slots = capacity * TABLE_SLOTS_PER_TOKEN
        self.slots = slots
        self.keys = np.zeros(slots, dtype=np.uint64)
        self.ends = np.full(slots, -1, dtype=np.int64)  # absolute ring position
        self.written = 0  # tokens ever written (absolute position of the next)

    def nbytes(self) -> int:
        return self.ring.nbytes + self.keys.nbytes + self.ends.nbytes

    def add(self, text: np.ndarray) -> None:
        """Append one request's text (its last ``capacity - 1`` tokens) as a
        segment, and index its n-grams (a later occurrence wins)."""
        text = np.asarray(text, dtype=np.int32)[-(self.capacity - 1):]
        if not len(text):
            return
        start = self.written
        positions = start + np.arange(len(text) + 1)
        self.ring[positions % self.capacity] = np.append(text, SEPARATOR)
        self.written += len(text) + 1
        for size in range(1, min(self.max_ngram, len(text)) + 1):
            keys = ngram_hashes(text, size)
            slots = (keys % np.uint64(self.slots)).astype(np.int64)
            self.keys[slots] = keys
            self.ends[slots] = start + size - 1 + np.arange(len(keys))

    def match(self, context: np.ndarray, length: int) -> tuple[np.ndarray, int]:
        """int32 [length] (-1 padded): what followed the latest occurrence in
        the ring of the longest suffix of ``context`` (1 .. max_ngram tokens)
        found there, up to its segment's end; and that suffix's length (0:
        none)."""
        out = np.full(length, -1, dtype=np.int32)
        tail = [int(t) for t in context[-self.max_ngram:]]
        oldest = self.written - self.capacity
        for size in range(len(tail), 0, -1):
            suffix = tail[-size:]
            key = ngram_hash(suffix)
            slot = key % self.slots
            end = int(self.ends[slot])
            # The n-gram and what follows must still be in the ring.
            if int(self.keys[slot]) != key or end - size + 1 <= oldest:
                continue
            if any(int(self.ring[(end - size + 1 + k) % self.capacity]) != token
                   for k, token in enumerate(suffix)):
                continue
            follow = self.ring[np.arange(end + 1, min(end + 1 + length, self.written))
                               % self.capacity]
            stop = np.flatnonzero(follow == SEPARATOR)
            follow = follow[:stop[0]] if len(stop) else follow
            out[:len(follow)] = follow
            return out, size
        return out, 0
