import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as an HF directory (fetched and converted once)."""
    from vllm_lookahead.models import ensure_model

    return str(ensure_model("smollm2"))


@pytest.fixture(scope="session")
def spec_bench_prompts(smollm2) -> list[str]:
    """One chat-formatted Spec-Bench prompt per category (13, of very
    different lengths)."""
    from benchmarks.common import SPEC_BENCH, chat_prompts, load_prompts

    per_category: dict[str, dict] = {}
    for prompt in load_prompts(SPEC_BENCH):
        per_category.setdefault(prompt["category"], prompt)
    return chat_prompts(smollm2, list(per_category.values()))
