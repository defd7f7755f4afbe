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
        ({"window": 0}, '"window"'),
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


@pytest.mark.parametrize("dtype, mode, error", [("bfloat16", "tree", "float32"),
                                                ("bfloat16", "linear", None),
                                                ("float32", "tree", None)])
def test_tree_mode_needs_float32_on_cpu(smollm2, dtype, mode, error):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_lookahead import patches

    patches.apply_all()
    args = EngineArgs(
        model=smollm2, dtype=dtype,
        speculative_config={"method": "custom_class",
                            "model": "vllm_lookahead.LookaheadProposer",
                            "num_speculative_tokens": 8},
        additional_config={"lookahead": {"mode": mode}})
    if error is None:
        args.create_engine_config()
    else:
        with pytest.raises(NotImplementedError, match=error):
            args.create_engine_config()
