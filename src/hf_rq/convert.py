"""Convert the authors' checkpoints to hf_rq ``save_pretrained`` folders.

Usage: ``python -m hf_rq.convert <kind> --checkpoint CKPT [--config CFG] --output DIR``; ``--help`` lists
the kinds. Each family's ``conversion`` module contributes its sub-commands through
``register_commands(subparsers)``, so this file does not change when a family adds a converter.
"""

from __future__ import annotations

import argparse
import importlib
import sys

FAMILIES = ("rq", "dq", "ctf")


def build_parser(prog: str = "python -m hf_rq.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"hf_rq.{family}.conversion")
        except ModuleNotFoundError as exc:
            if exc.name != f"hf_rq.{family}.conversion":
                raise
            continue
        register = getattr(module, "register_commands", None)
        if register is not None:
            register(sub)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, needs_config: bool = True) -> None:
    parser.add_argument("--checkpoint", required=True, help="official checkpoint (.safetensors, or .pt/.ckpt with --allow-pickle)")
    if needs_config:
        parser.add_argument("--config", required=True, help="official config (.yaml or .json)")
    parser.add_argument("--output", required=True, help="output folder for save_pretrained")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading pickle-based checkpoints (always with torch.load(weights_only=True))")


def main(argv=None, prog: str = "python -m hf_rq.convert") -> int:
    from .checkpoint_utils import CheckpointError

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
