"""Attention-backend adapters: one per KV-cache layout.

An adapter knows how one layout stores a layer's keys and values and gives
the runtime two views, ``[num_blocks, block_size, kv_heads, head_size]``
each (any strides), over which the compiled ops attend the tree rows and
compact the accepted path. Which adapter serves which vLLM backend and
dtype is decided in :func:`adapter_for`; what is refused says so there.

| vLLM backend | layout | adapter |
| --- | --- | --- |
| CPU_ATTN, ISA vec / vec16 (fp32, bf16, fp16 without AMX) | LBHNC, keys transposed per block | :class:`CpuVecAdapter` |
| CPU_ATTN, ISA amx (bf16 on AMX CPUs; CPU_ATTN block sizes are multiples of 32) | keys in 16-token VNNI groups | refused (FLEX_ATTENTION or fp32 instead) |
| FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION | LBNHC | :class:`LbnhcAdapter` |
| FLASHINFER | LBNHC or HND (SM100) | refused |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from vllm_lookahead import ops

LBNHC_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION")
CPU_VEC_ISAS = ("vec", "vec16")


class KVLayoutAdapter(ABC):
    """How the tree runtime reads and writes one KV-cache layout."""

    name: ClassVar[str]

    @abstractmethod
    def cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value views [num_blocks, block_size, kv_heads, head_size]
        of one layer's cache."""

    def attend(self, query: torch.Tensor, tree_key: torch.Tensor, tree_value: torch.Tensor,
               kv_cache: torch.Tensor, block_table: torch.Tensor, prefix_lens: torch.Tensor,
               cu_nodes: torch.Tensor, masks: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the tree rows over their paged prefix plus their
        ancestors (``ops.tree_attention``)."""
        key_cache, value_cache = self.cache_views(kv_cache)
        return ops.tree_attention(query, tree_key, tree_value, key_cache, value_cache,
                                  block_table, prefix_lens, cu_nodes, masks, scale)

    def compact(self, kv_caches: Sequence[torch.Tensor], src_slots: torch.Tensor,
                dst_slots: torch.Tensor) -> None:
        """Copy slot ``src_slots[i]`` to ``dst_slots[i]`` in every layer."""
        views = [self.cache_views(c) for c in kv_caches]
        device = views[0][0].device
        ops.tree_kv_compact([k for k, _ in views], [v for _, v in views],
                            src_slots.to(device), dst_slots.to(device))


class CpuVecAdapter(KVLayoutAdapter):
    """vLLM's CPU_ATTN "vec"/"vec16" kernels (every dtype): a layer's cache
    is [num_blocks, kv_heads, block_size, 2 * head_size], every (block,
    head) holding the keys transposed, [head_size, block_size], then the
    values, [block_size, head_size]."""

    name = "CPU_ATTN (vec)"

    def cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_blocks, kv_heads, block_size, two_d = kv_cache.shape
        head_size = two_d // 2
        per_head = kv_cache.reshape(num_blocks, kv_heads, 2, block_size * head_size)
        keys = per_head[:, :, 0].unflatten(-1, (head_size, block_size)).permute(0, 3, 1, 2)
        values = per_head[:, :, 1].unflatten(-1, (block_size, head_size)).permute(0, 2, 1, 3)
        return keys, values


class LbnhcAdapter(KVLayoutAdapter):
    """The layout of vLLM's CUDA backends (FLASH_ATTN, TRITON_ATTN,
    FLEX_ATTENTION): logical [num_blocks, kv_heads, block_size, 2 *
    head_size] with physical order [num_blocks, block_size, kv_heads, 2 *
    head_size], keys then values in the last axis."""

    name = "LBNHC"

    def cache_views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(kv_cache.shape[-1] // 2, -1)
        return key_cache, value_cache


def adapter_for(backend: str, isa: str | None = None) -> KVLayoutAdapter:
    """The adapter of a vLLM attention backend (``get_name()``), and for
    CPU_ATTN its kernel ISA; raises NotImplementedError saying what to
    change where the layout is not supported."""
    if backend == "CPU_ATTN":
        if isa in CPU_VEC_ISAS:
            return CpuVecAdapter()
        raise NotImplementedError(
            f"tree speculation: vLLM's CPU attention kernel {isa!r} packs the KV cache in a "
            "layout the tree runtime does not read (only 'vec' and 'vec16'; 'amx' is vLLM's "
            "kernel for bf16 on AMX CPUs, whose CPU_ATTN block sizes are multiples of 32): "
            "pass dtype='float32', or the FLEX_ATTENTION backend (block_size=16, "
            "attention_config={\"backend\": \"FLEX_ATTENTION\", \"flex_attn_kv_block_size\": "
            "128}), or use lookahead mode \"linear\"")
    if backend in LBNHC_BACKENDS:
        return LbnhcAdapter()
    raise NotImplementedError(
        f"tree speculation does not support the {backend} attention backend yet "
        f"(supported: CPU_ATTN, {', '.join(LBNHC_BACKENDS)}); select one with "
        "attention_config={'backend': 'FLASH_ATTN'} (or TRITON_ATTN), or use lookahead "
        "mode \"linear\"")
