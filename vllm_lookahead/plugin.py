"""``vllm.general_plugins`` entry point: vLLM calls ``register`` in every
process it starts, before building the model runner."""

from vllm_lookahead import patches


def register() -> None:
    patches.apply_all()
