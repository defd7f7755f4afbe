"""Tree attention inside vLLM's attention backends.

Each supported backend is subclassed (its impl's ``forward`` runs as usual,
then the tree runtime recomputes the tree nodes' rows) and registered in
vLLM's attention-backend registry under the backend's own name, in every
process (``register_tree_backends``, from the plugin). The CUDA backends'
subclasses live in ``attention_cuda`` so that this module imports on CPU.
On CPU, ``attention_config={"backend": "FLEX_ATTENTION"}`` selects vLLM's
FLEX_ATTENTION backend (the CUDA backends' LBNHC layout, run on CPU), which
vLLM's CPU platform otherwise ignores; its block mask is then built the
generic way, in eager mode (``FLEX_ON_CPU``).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.attention.backends.flex_attention import (
    FlexAttentionBackend, FlexAttentionImpl, FlexAttentionMetadata,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from vllm_lookahead.tree.backends import KVLayoutAdapter, adapter_for
from vllm_lookahead.tree.runtime import TreeRuntime
from vllm_lookahead.vllm import Patch

TREE_BACKENDS = {
    AttentionBackendEnum.CPU_ATTN: "vllm_lookahead.vllm.attention.TreeCPUAttentionBackend",
    AttentionBackendEnum.FLEX_ATTENTION: "vllm_lookahead.vllm.attention.TreeFlexAttentionBackend",
    AttentionBackendEnum.FLASH_ATTN: "vllm_lookahead.vllm.attention_cuda.TreeFlashAttentionBackend",
    AttentionBackendEnum.TRITON_ATTN:
        "vllm_lookahead.vllm.attention_cuda.TreeTritonAttentionBackend",
}


def register_tree_backends() -> None:
    for backend, path in TREE_BACKENDS.items():
        register_backend(backend, path)


class TreeAttention:
    """Mixin of a backend impl: after the backend's own attention, the tree
    nodes' rows of a tree step are recomputed by the runtime (prefix plus
    ancestors instead of the causal window). The model runner sets
    ``tree_runtime`` on every attention layer's impl."""

    tree_runtime: TreeRuntime | None = None
    _tree_adapter: KVLayoutAdapter | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                *args, **kwargs):
        result = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 *args, **kwargs)
        self.attend_tree_rows(layer, query, key, value, kv_cache, attn_metadata, output)
        return result

    def tree_adapter(self, layer: Any) -> KVLayoutAdapter:
        return adapter_for(self.backend_name())

    @classmethod
    def backend_name(cls) -> str:
        raise NotImplementedError

    def attend_tree_rows(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                         output: torch.Tensor) -> None:
        runtime = self.tree_runtime
        if runtime is None or attn_metadata is None:
            return
        step = runtime.current
        if step is None or not step.has_trees:
            return
        if self._tree_adapter is None:
            if (getattr(self, "sliding_window", None) not in (None, -1, (-1, -1))
                    or getattr(self, "logits_soft_cap", None)
                    or getattr(self, "alibi_slopes", None) is not None
                    or getattr(self, "sinks", None) is not None):
                raise NotImplementedError(
                    "tree speculation does not support sliding-window, soft-capped, "
                    "ALiBi or sink attention")
            self._tree_adapter = self.tree_adapter(layer)
        runtime.attend(self._tree_adapter, query, key, value, kv_cache, self.scale, output)


class TreeCPUAttentionImpl(TreeAttention, CPUAttentionBackendImpl):
    @classmethod
    def backend_name(cls) -> str:
        return "CPU_ATTN"

    def tree_adapter(self, layer: Any) -> KVLayoutAdapter:
        return adapter_for("CPU_ATTN", isa=getattr(layer, "isa", None))


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionImpl]:
        return TreeCPUAttentionImpl


# The CPU wheel has no _C_cache_ops.reshape_and_cache_flash.
_HAS_FLASH_CACHE_OP = hasattr(torch.ops._C_cache_ops, "reshape_and_cache_flash")


class TreeFlexAttentionImpl(TreeAttention, FlexAttentionImpl):
    @classmethod
    def backend_name(cls) -> str:
        return "FLEX_ATTENTION"

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if _HAS_FLASH_CACHE_OP:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        slots = slot_mapping.to(torch.int64)
        valid = slots >= 0
        slots = slots[valid]
        block_size = key_cache.shape[1]
        where = (slots // block_size, slots % block_size)
        n = len(slot_mapping)
        key_cache.index_put_(where, key[:n][valid].to(key_cache.dtype))
        value_cache.index_put_(where, value[:n][valid].to(value_cache.dtype))
        return None


class TreeFlexAttentionBackend(FlexAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeFlexAttentionImpl]:
        return TreeFlexAttentionImpl


class CpuPlatformPatch(Patch):
    """Honours ``attention_config={"backend": "FLEX_ATTENTION"}`` on CPU:
    vLLM's FLEX_ATTENTION backend keeps the CUDA backends' LBNHC cache
    layout and runs on CPU (set ``flex_attn_kv_block_size`` 128 there:
    Inductor's CPU code cannot lower FLEX's direct block mask), which makes
    the CUDA layout and glue testable on a CPU machine."""

    target = CpuPlatform

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if (selected_backend == AttentionBackendEnum.FLEX_ATTENTION
                and not attn_selector_config.use_mla and not attn_selector_config.use_sparse):
            return AttentionBackendEnum.FLEX_ATTENTION.get_path()
        original = CpuPlatformPatch.original("get_attn_backend_cls")
        return original(selected_backend, attn_selector_config, num_heads)


# FLEX_ATTENTION on CPU (torch 2.13's Inductor): the direct block mask (cache
# block size == mask block size) fails the CPU flex kernel's size check (its
# KV blocks span max_seq_len, the key tensor the whole cache), and the
# compiled generic builder does not compile (C++ VecMask type error); the
# generic builder in eager mode works.
FLEX_ON_CPU = {"block_size": 16, "flex_attn_kv_block_size": 128}


def check_flex_on_cpu(vllm_config: Any) -> None:
    """FLEX_ATTENTION on CPU needs the generic block mask: a cache block
    size other than FLEX's KV mask block size."""
    backend = vllm_config.attention_config.backend
    if (vllm_config.device_config.device_type != "cpu" or backend is None
            or backend != AttentionBackendEnum.FLEX_ATTENTION):
        return
    mask_block = vllm_config.attention_config.flex_attn_kv_block_size
    if mask_block is None or mask_block == vllm_config.cache_config.block_size:
        raise ValueError(
            "FLEX_ATTENTION on CPU needs a cache block size other than its KV mask block "
            f"size (got block_size={vllm_config.cache_config.block_size}, "
            f"flex_attn_kv_block_size={mask_block}): pass block_size=16 and "
            'attention_config={"backend": "FLEX_ATTENTION", "flex_attn_kv_block_size": 128}')


class FlexAttentionMetadataPatch(Patch):
    """On CPU, FLEX's generic block mask in eager mode (see FLEX_ON_CPU)."""

    target = FlexAttentionMetadata

    def build_block_mask(self):
        if self.block_table.device.type != "cpu":
            return FlexAttentionMetadataPatch.original("build_block_mask")(self)
        from torch.nn.attention.flex_attention import create_block_mask

        kv_len = self.total_cache_tokens if self.uses_paged_kv else self.num_actual_tokens
        return create_block_mask(self.get_mask_mod(), None, None, self.num_actual_tokens,
                                 kv_len, device=self.block_table.device,
                                 BLOCK_SIZE=(self.q_block_size, self.kv_block_size))
