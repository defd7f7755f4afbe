"""Token recycling (arXiv 2408.08696): the target's own predictions as drafts.

Every target forward yields, at every logits row, the target's top-k next
tokens after that row's input token. :class:`SuccessorTable` keeps, for each
token of the vocabulary, the top-k of the last row it was the input of (one
table shared by all requests: what one request's forwards predicted after a
token drafts for every other request), updated from every step: tree nodes,
accepted or not, and plain decode rows (``tree.protocol.Predictions``). A
draft tree is read from it by a fixed template (:func:`tree_template`):
template node j under node ``parents[j]`` is the rank ``ranks[j]`` successor
of its parent's token, starting from the request's last token. The measured
budget prices each template node as its own class.

Memory: ``vocab_size * ranks * 4`` bytes (Qwen2.5, 151,936 tokens x 8 ranks:
4.6 MiB), fixed at start, whatever the number of requests.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from vllm_lookahead import ops

# Prior acceptance of a successor by rank, for the template's shape only
# (the budget measures the real rates per template node).
RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)
# Template edges of the context-match chain (``chain_tokens``): rank
# ``CHAIN``, prior acceptance ``CHAIN_PRIOR`` at depth 1, times
# ``CHAIN_DECAY`` per depth below (shape only, as ``RANK_PRIOR``).
CHAIN = -1
CHAIN_PRIOR, CHAIN_DECAY = 0.5, 0.7


def tree_template(nodes: int, ranks: int, max_depth: int,
                  chain: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``nodes`` likeliest paths of a tree whose edges are successor
    ranks, by :data:`RANK_PRIOR`, and (``chain`` > 0) a path of ``chain``
    nodes under the root whose edges are ``CHAIN`` (the context-match
    continuation, filled per step), placed among them by its own prior:
    best first, so every prefix of the template is a tree and parents come
    before children. int32 parents (-1: the root) and ranks."""
    prior = np.asarray(RANK_PRIOR[:ranks] + (RANK_PRIOR[-1],) * max(0, ranks - len(RANK_PRIOR)))
    parents: list[int] = []
    edge_ranks: list[int] = []
    # (-path probability, tie-break, parent, rank, depth)
    heap = [(-prior[r], r, -1, r, 1) for r in range(ranks) if nodes]
    if chain:
        heap.append((-CHAIN_PRIOR, -1, -1, CHAIN, 1))
    heapq.heapify(heap)
    counter = ranks
    recycled = 0
    while heap:
        neg_p, _, parent, rank, depth = heapq.heappop(heap)
        if rank != CHAIN:
            if recycled == nodes:
                continue
            recycled += 1
        node = len(parents)
        parents.append(parent)
        edge_ranks.append(rank)
        if rank == CHAIN:
            if depth < chain:
                heapq.heappush(heap, (neg_p * CHAIN_DECAY, counter, node, CHAIN, depth + 1))
                counter += 1
        elif depth < max_depth and recycled < nodes:
            for r in range(ranks):
                heapq.heappush(heap, (neg_p * prior[r], counter, node, r, depth + 1))
                counter += 1
    return np.asarray(parents, dtype=np.int32), np.asarray(edge_ranks, dtype=np.int32)


def chain_depths(parents: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Depth below the root (0-based) of each ``CHAIN`` node of a template,
    -1 for the others."""
    depths = np.full(len(parents), -1, dtype=np.int64)
    for j, (parent, rank) in enumerate(zip(parents, ranks)):
        if rank == CHAIN:
            depths[j] = 0 if parent < 0 else depths[parent] + 1
    return depths


# Longest context suffix the chain matches, and so the number of match sizes
# whose chains the budget prices apart.
CHAIN_MAX_NGRAM = 4


def chain_tokens(contexts: list[np.ndarray], length: int,
                 max_ngram: int = CHAIN_MAX_NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """int32 [len(contexts), length], -1 padded: for each context, the
    ``length`` tokens that followed the earliest occurrence of its longest
    suffix of 1 .. ``max_ngram`` tokens seen before (prompt lookup, the
    match of vLLM ``ngram``); and int64 [len(contexts)], that suffix's
    length (0: none). How much of a chain is accepted depends mostly on that
    length: Qwen2.5-Coder-1.5B's greedy Spec-Bench outputs (39 prompts, 64
    tokens) accepted a chain's first token after 18% of 1-token matches,
    47% of 2-token, 65% of 3-token and 78% of 4-token matches."""
    out = np.full((len(contexts), length), -1, dtype=np.int32)
    sizes = np.zeros(len(contexts), dtype=np.int64)
    for i, context in enumerate(contexts):
        n = len(context)
        # ends[j]: context[j - l] == context[n - 1 - l] for every l < L,
        # over the ends j < n - 1 of earlier occurrences.
        ends = context[:n - 1] == context[n - 1] if n > 1 else np.zeros(0, bool)
        best = None
        for size in range(1, min(max_ngram, n - 1) + 1):
            if size > 1:
                ends = ends & np.concatenate(
                    [np.zeros(size - 1, bool), context[:n - size] == context[n - size]])
            found = np.flatnonzero(ends)
            if not len(found):
                break
            best, sizes[i] = int(found[0]), size
        if best is not None:
            follow = context[best + 1:best + 1 + length]
            out[i, :len(follow)] = follow
    return out, sizes


class SuccessorTable:
    """The target's top-k successors per token (``ops.recycle_update`` /
    ``ops.recycle_tree``), shared by all requests."""

    def __init__(self, vocab_size: int, ranks: int, device: torch.device | str = "cpu"):
        if vocab_size < 1 or ranks < 1:
            raise ValueError("vocab_size and ranks must be >= 1")
        self.vocab_size = vocab_size
        self.ranks = ranks
        self.table = torch.full((vocab_size, ranks), -1, dtype=torch.int32, device=device)

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def update(self, input_tokens: np.ndarray, topk: np.ndarray) -> None:
        """Rows in order (a later row of a token wins): ``topk[i]`` after
        ``input_tokens[i]``. Rows of tokens outside the vocabulary are
        dropped, and so are successors outside it (padded logits)."""
        keep = (input_tokens >= 0) & (input_tokens < self.vocab_size)
        if not keep.any():
            return
        tokens = np.ascontiguousarray(input_tokens[keep], dtype=np.int32)
        top = topk[keep][:, :self.ranks]
        top = np.ascontiguousarray(np.where(top < self.vocab_size, top, -1), dtype=np.int32)
        ops.recycle_update(self.table, torch.from_numpy(tokens).to(self.table.device),
                           torch.from_numpy(top).to(self.table.device))

    def trees(self, roots: np.ndarray, parents: np.ndarray, ranks: np.ndarray) -> torch.Tensor:
        """int32 [len(roots), T]: the template read from each root (-1:
        unknown or disabled, rank < 0)."""
        device = self.table.device
        as_i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
        return ops.recycle_tree(self.table, as_i32(roots), as_i32(parents), as_i32(ranks)).cpu()
