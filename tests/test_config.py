import pytest

from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError


def test_defaults_are_valid():
    assert LookaheadConfig.from_dict(None) == LookaheadConfig()


@pytest.mark.parametrize(
    "raw, names",
    [
        ({"ngarm": 3}, "ngarm"),
        ({"ngram": 1}, '"ngram"'),
        ({"ngram": "4"}, '"ngram"'),
        ({"capacity": 0}, '"capacity"'),
        ({"buckets": 1000}, '"buckets"'),
        ({"ways": 3}, '"ways"'),
        ({"key_len": 4, "ngram": 4}, '"key_len"'),
        ({"shared_pool": "yes"}, '"shared_pool"'),
        ({"adaptive": 1}, '"adaptive"'),
        ({"budget": "fast"}, '"budget"'),
        ([1, 2], "JSON object"),
        ({"mode": "fast"}, '"mode"'),
        ({"window": -1}, '"window"'),
        ({"guesses": -1}, '"guesses"'),
        ({"max_tree_tokens": "64"}, '"max_tree_tokens"'),
        ({"pool_from_prompt": 0}, '"pool_from_prompt"'),
    ],
)
def test_bad_values_name_the_key(raw, names):
    with pytest.raises(LookaheadConfigError, match=names):
        LookaheadConfig.from_dict(raw)


def test_key_len_defaults_by_mode():
    assert LookaheadConfig.from_dict({"mode": "tree"}).key_len == 1
    assert LookaheadConfig.from_dict({"mode": "linear"}).key_len == 2
    assert LookaheadConfig.from_dict({"mode": "linear", "ngram": 2}).key_len == 1


@pytest.mark.parametrize("dtype, mode, error", [("bfloat16", "tree", None),
                                                ("bfloat16", "linear", None),
                                                ("float32", "tree", None),
                                                ("float32", "sideways", '"mode"')])
def test_tree_mode_dtypes_and_bad_mode_at_startup(smollm2, monkeypatch, dtype, mode, error):
    """On a CPU without AMX (emulated: bf16 on an AMX CPU is refused, see
    ``test_bf16_tree_mode_on_an_amx_cpu``)."""
    import torch
    from vllm.engine.arg_utils import EngineArgs

    from vllm_lookahead import vllm as vllm_patches

    vllm_patches.apply_all()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    args = EngineArgs(
        model=smollm2, dtype=dtype,
        speculative_config={"method": "custom_class",
                            "model": "vllm_lookahead.LookaheadProposer",
                            "num_speculative_tokens": 8},
        additional_config={"lookahead": {"mode": mode}})
    if error is None:
        args.create_engine_config()
    else:
        with pytest.raises(LookaheadConfigError, match=error):
            args.create_engine_config()


@pytest.mark.parametrize("block_size, error", [(128, "'amx'"), (None, "'amx'"), (32, "'amx'")])
def test_bf16_tree_mode_on_an_amx_cpu(smollm2, monkeypatch, block_size, error):
    """vLLM's CPU kernel packs bf16 keys for AMX (its CPU_ATTN block sizes
    are multiples of 32, so always on an AMX CPU): tree mode refuses at
    startup and says what to use instead."""
    import torch
    from vllm.engine.arg_utils import EngineArgs

    from vllm_lookahead import vllm as vllm_patches

    vllm_patches.apply_all()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    args = EngineArgs(
        model=smollm2, dtype="bfloat16", block_size=block_size,
        speculative_config={"method": "custom_class",
                            "model": "vllm_lookahead.LookaheadProposer",
                            "num_speculative_tokens": 8})
    if error is None:
        args.create_engine_config()
    else:
        with pytest.raises(NotImplementedError, match=error):
            args.create_engine_config()
