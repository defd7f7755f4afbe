"""Lossless lookahead and staged speculative decoding for vLLM."""

from vllm_lookahead.patches import check_vllm_version

check_vllm_version()

from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError  # noqa: E402
from vllm_lookahead.proposers.lookahead import LookaheadProposer  # noqa: E402

__all__ = ["LookaheadConfig", "LookaheadConfigError", "LookaheadProposer"]
