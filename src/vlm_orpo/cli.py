"""The command line: a table of commands. Each command's module owns its `HELP`, `add_arguments` and `run`.

Errors a user can cause are one line on stderr (exit 2); a run stopped for a reason the user can act on is one
line too (exit 1, or 130 for Ctrl-C); never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vlm_orpo.errors import ConfigError, DataError, RunStopped

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)
COMMANDS = {  # command -> module
    "train": "vlm_orpo.train",
    "evaluate": "vlm_orpo.evaluate",
    "merge": "vlm_orpo.deploy.merge",
    "quantize": "vlm_orpo.deploy.quantize",
    "serve": "vlm_orpo.deploy.serve",
    "chat": "vlm_orpo.deploy.chat",
    "assets": "vlm_orpo.assets",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-orpo", description="Preference fine-tuning for vision-language models, the image and prompt "
        "computed once per pair."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"error: vlm-orpo {args.command} stopped by Ctrl-C", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
