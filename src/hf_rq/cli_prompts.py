"""``hf-rq generate --prompt``: the prompt side of the CLI, for any pipeline whose ``__call__`` takes ``prompt``."""

from __future__ import annotations

import inspect
import re


def add_prompt_arguments(parser) -> None:
    g = parser.add_argument_group("text-to-image (pipelines whose models read text)")
    g.add_argument("--prompt", nargs="+", metavar="TEXT",
                   help="one or more prompts (quote each); --num-images images per prompt")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="the unconditional branch of guidance instead of the null text (needs --guidance-scale > 1)")


def takes_prompt(pipe) -> bool:
    return "prompt" in inspect.signature(pipe.__call__).parameters


def prompt_requests(pipe, args, error) -> list[str] | None:
    """The prompts to sample (None without --prompt); ``error(message)`` builds the CLI's exception."""
    text_model = bool(getattr(pipe.transformer.config, "is_text_conditional", False))
    if not args.prompt:
        if args.negative_prompt is not None:
            raise error("--negative-prompt needs --prompt")
        if text_model:
            raise error(f"{args.model} is a text-to-image model: pass --prompt \"...\"")
        return None
    if not takes_prompt(pipe):
        raise error(f"{type(pipe).__name__} takes no prompt: use --class (or nothing, for an unconditional model)")
    if args.class_labels:
        raise error("give either --prompt or --class, not both")
    if not text_model:
        raise error(f"{args.model} is not a text-to-image model: use --class (or nothing, for an unconditional model)")
    return list(args.prompt)


def prompt_call_arguments(batch: list[str], args) -> dict:
    negative = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
    return {"prompt": batch, **negative}


def prompt_file_label(text: str, limit: int = 40) -> str:
    """A file-name-safe label for a prompt ("grinning face" -> "grinning_face")."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")[:limit] or "empty_prompt"
