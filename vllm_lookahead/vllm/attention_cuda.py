"""Tree attention in vLLM's CUDA attention backends (imported only where
vLLM resolves these registry entries: on CUDA). Both keep the LBNHC layout
(``tree.backends.LbnhcAdapter``)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from vllm_lookahead.vllm.attention import TreeAttention


class TreeFlashAttentionImpl(TreeAttention, FlashAttentionImpl):
    @classmethod
    def backend_name(cls) -> str:
        return "FLASH_ATTN"


class TreeFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeFlashAttentionImpl]:
        return TreeFlashAttentionImpl


class TreeTritonAttentionImpl(TreeAttention, TritonAttentionImpl):
    @classmethod
    def backend_name(cls) -> str:
        return "TRITON_ATTN"


class TreeTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeTritonAttentionImpl]:
        return TreeTritonAttentionImpl
