"""Target tokens for tree verification: argmax, or a position-keyed sample.

A tree's nodes are a deterministic function of the context (pool guesses,
a draft model's top-k), so each draft is a point mass and SpecInfer's
multi-candidate rule reduces to: draw the target's token at the parent, and
descend into the child carrying that token (if any). Verification therefore
only needs one *target token* per node, and ``ops.tree_accept_greedy``
accepts the deepest path matching them.

For sampled requests the token predicted for position ``t`` is drawn by
inverse-CDF sampling with a uniform ``u(seed, t)`` that depends only on the
request's seed and ``t``. Every node predicting position ``t`` shares it, so
the emitted token at ``t`` is ``F_prefix^-1(u(seed, t))`` for the accepted
prefix, exactly as if the token were sampled without speculation: the
distribution is the target's, and the output for a given seed does not
depend on the tree shapes, the batch or the acceptance history.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_uniforms(seeds: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per (seed, position) pair; a stateless
    counter-based hash (splitmix64 of the seed, then of the position)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray(seeds, dtype=np.uint64) & _MASK64)
        bits = _splitmix64(key ^ np.asarray(positions, dtype=np.uint64))
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """vLLM's top-k / top-p masking (ties at the k-th value are kept; top-p
    keeps the smallest high-probability set whose mass reaches p, and at
    least one token). top_k int [R] (0 or >= vocab: off), top_p float [R]."""
    vocab = logits.shape[-1]
    if top_k is not None:
        k = top_k.to(torch.int64).clamp(min=0)
        k = torch.where((k == 0) | (k > vocab), vocab, k)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ascending, order = logits.sort(dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p.to(cumulative.dtype)[:, None]
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                uniforms: torch.Tensor) -> torch.Tensor:
    """int32 [R]: per row, the token at ``uniforms`` of the CDF of
    softmax(top_k_top_p(logits / temperature)), the distribution vLLM's
    sampler draws from. Per-row arguments [R] on the CPU; logits [R, V]."""
    rows = logits.to(torch.float32).cpu() / temperature.to(torch.float32)[:, None]
    rows = apply_top_k_top_p(rows, top_k, top_p)
    cdf = rows.softmax(dim=-1).to(torch.float64).cumsum(dim=-1)
    point = (uniforms * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, point, right=True).flatten()
    return picked.clamp(max=logits.shape[-1] - 1).to(torch.int32)
