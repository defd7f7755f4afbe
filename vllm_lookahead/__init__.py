"""Lossless lookahead and staged speculative decoding for vLLM.

``vllm_lookahead.ops`` (the compiled ops) imports without vLLM, so the ops
can be built and tested on a machine that has only torch; the proposers and
the vLLM plugin check the pinned vLLM version when first imported.
"""

from typing import Any

# libtorch before the compiled ops (vllm_lookahead._C links against it).
import torch  # noqa: F401

__all__ = ["LookaheadConfig", "LookaheadConfigError", "LookaheadProposer"]


def __getattr__(name: str) -> Any:
    if name in ("LookaheadConfig", "LookaheadConfigError"):
        from vllm_lookahead import config

        return getattr(config, name)
    if name == "LookaheadProposer":
        from vllm_lookahead.vllm import check_vllm_version

        check_vllm_version()
        from vllm_lookahead.proposers.lookahead import LookaheadProposer

        return LookaheadProposer
    raise AttributeError(f"module 'vllm_lookahead' has no attribute {name!r}")
