"""``vllm.general_plugins`` entry point: vLLM calls ``register`` in every
process it starts, before building the model runner."""

import logging

from vllm_lookahead import vllm as vllm_patches


def _log_like_vllm() -> None:
    """This package's log lines (patches applied, proposer settings, stats)
    go where vLLM's go, formatted the same; vLLM configures only its own
    ``vllm`` logger."""
    ours, theirs = logging.getLogger("vllm_lookahead"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def register() -> None:
    _log_like_vllm()
    vllm_patches.apply_all()
