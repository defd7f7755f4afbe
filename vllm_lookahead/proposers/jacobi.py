"""The lookahead branch: a 2D Jacobi window and the token tree of one step.

Window: ``levels[l, j]`` for l < N-1 levels and j < W columns. In a step
whose root (last accepted token) sits at position p, level 0 is a chain
p+1..p+W from the root, and level l column j hangs under level l-1 column j
(position p+1+j+l). So column j read downwards is a guess of N-1 consecutive
tokens, and the target's argmax at its deepest node guesses the next one:
together an n-gram for the pool. The argmaxes of the deepest level then
become the newest level and the oldest level is dropped (the reference
implementation's update), after a warm-up that fills the levels one by one.

Verification candidates (pool continuations of the last ``key_len`` tokens)
follow the lookahead nodes as a trie under the root, shared prefixes merged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class JacobiWindow:
    levels: np.ndarray  # int32 [N-1, W]
    filled: int  # levels holding guesses (1 .. N-1)

    @classmethod
    def from_context(cls, context: np.ndarray, levels: int, window: int) -> JacobiWindow:
        """Level 0 from context tokens (the reference's initialisation),
        chosen by a generator seeded with the context length, so a request
        replays identically."""
        rng = np.random.default_rng(len(context))
        grid = np.zeros((levels, window), dtype=np.int32)
        grid[0] = rng.choice(context, size=window)
        return cls(levels=grid, filled=1)

    def advance(self, new_level: np.ndarray) -> np.ndarray | None:
        """Take the target's argmax at the deepest level's first ``w``
        columns; returns the [w, N] n-grams they complete (None while the
        window is warming up)."""
        w = len(new_level)
        if self.filled < len(self.levels):
            self.levels[self.filled, :w] = new_level
            self.filled += 1
            return None
        ngrams = np.concatenate([self.levels[:, :w].T, new_level[:, None]], axis=1)
        self.levels[:-1, :w] = self.levels[1:, :w]
        self.levels[-1, :w] = new_level
        return ngrams


def fit_tree(cap: int, window: int, guesses: int, filled: int, cont_len: int) -> tuple[int, int]:
    """Columns and candidates (w <= window, g <= guesses) whose tree has at
    most ``cap`` nodes: both scaled down in proportion, then topped up,
    candidates first."""
    full = window * filled + guesses * cont_len
    if full <= cap:
        return window, guesses
    w, g = window * cap // full, guesses * cap // full
    while g < guesses and w * filled + (g + 1) * cont_len <= cap:
        g += 1
    while w < window and (w + 1) * filled + g * cont_len <= cap:
        w += 1
    return w, g


def tree_layout(window: JacobiWindow, w: int, candidates: list[list[int]],
                max_ranks: int, ranks: list[int] | None = None,
                recycled: list[int] | None = None, recycled_parents: list[int] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, parents (request-local, -1: the root) and classes of one
    step's tree: the first ``w`` columns of the filled levels, level by
    level, then one trie under the root of the recycled tree (template node
    j: token ``recycled[j]``, -1 absent, under template node
    ``recycled_parents[j]``) and the ``candidates`` (most recent first, each
    at most ``cont_len`` tokens), shared prefixes merged. A node's class is
    its place in the tree: level l, column j of the window is ``l * W + j``;
    depth d of the candidate of rank r (``ranks[i]`` for ``candidates[i]``,
    default i) that first reaches it is ``(N-1) * W + min(r, max_ranks - 1)
    * (N-1) + d``; recycled template node j is ``(N-1) * W + max_ranks *
    (N-1) + j``, so there are ``num_classes(N-1, W, max_ranks, T)`` classes.
    This is the reference of the compiled ``ops.lookahead_tree_layout``,
    which the proposer calls."""
    filled = window.filled
    levels, columns = window.levels.shape
    la_tokens = window.levels[:filled, :w].reshape(-1)
    la_parents = np.arange(filled * w, dtype=np.int32) - w
    la_parents[:w] = np.arange(-1, w - 1)
    la_classes = (np.arange(filled)[:, None] * columns + np.arange(w)).reshape(-1)
    tokens, parents, classes = la_tokens.tolist(), la_parents.tolist(), la_classes.tolist()
    children: dict[tuple[int, int], int] = {}

    def child(parent: int, token: int, cls: int) -> int:
        node = children.get((parent, token))
        if node is None:
            node = children[(parent, token)] = len(tokens)
            tokens.append(token)
            parents.append(parent)
            classes.append(cls)
        return node

    mapped: list[int | None] = []
    recycled_class = levels * columns + max_ranks * levels
    for j, (token, parent) in enumerate(zip(recycled or [], recycled_parents or [])):
        under = -1 if parent < 0 else mapped[parent]
        mapped.append(None if token < 0 or under is None
                      else child(under, token, recycled_class + j))
    for rank, candidate in zip(ranks or range(len(candidates)), candidates):
        first = levels * columns + min(rank, max_ranks - 1) * levels
        parent = -1
        for depth, token in enumerate(candidate):
            parent = child(parent, token, first + depth)
    return (np.asarray(tokens, dtype=np.int32), np.asarray(parents, dtype=np.int32),
            np.asarray(classes, dtype=np.int64))


def num_classes(levels: int, columns: int, max_ranks: int, recycled_nodes: int = 0) -> int:
    return levels * columns + max_ranks * levels + recycled_nodes


def reference_tree_layouts(grids, filled, columns, candidates, candidate_lens, caps, max_ranks,
                           recycled=None, recycled_parents=None):
    """Reference of ``ops.lookahead_tree_layout``: per request the recycled
    nodes present (under the cap) first, :func:`fit_tree` of the rest, then
    :func:`tree_layout`."""
    grids, candidates, candidate_lens = grids.numpy(), candidates.numpy(), candidate_lens.numpy()
    batch, levels, width = grids.shape
    if recycled is None:
        recycled = torch.full((batch, 0), -1, dtype=torch.int32)
        recycled_parents = torch.zeros(0, dtype=torch.int32)
    recycled, recycled_parents = recycled.numpy(), recycled_parents.numpy()
    template = recycled_parents.shape[0]
    cont_len = candidates.shape[2]
    out = np.zeros((3, batch, levels * width + template + candidates.shape[1] * cont_len),
                   np.int32)
    out[1:] = -1
    num_nodes = np.zeros(batch, np.int32)
    used_columns = np.zeros(batch, np.int32)
    for b in range(batch):
        ranks = np.nonzero(candidate_lens[b])[0].tolist()
        kept = [candidates[b, r, :candidate_lens[b, r]].tolist() for r in ranks]
        cap = int(caps[b])
        present: list[bool] = []
        for j in range(template):
            parent = recycled_parents[j]
            present.append(bool(recycled[b, j] >= 0 and (parent < 0 or present[parent])))
        w, g = fit_tree(cap - min(sum(present), cap), int(columns[b]), len(kept),
                        int(filled[b]), cont_len)
        window = JacobiWindow(levels=grids[b], filled=int(filled[b]))
        tree = tree_layout(window, w, kept[:g], max_ranks, ranks[:g],
                           recycled[b].tolist(), recycled_parents.tolist())
        n = min(len(tree[0]), cap)
        for k, x in enumerate(tree):
            out[k, b, :n] = x[:n]
        num_nodes[b], used_columns[b] = n, w
    return (*torch.from_numpy(out), torch.from_numpy(num_nodes), torch.from_numpy(used_columns))
