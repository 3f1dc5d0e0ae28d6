"""luffy-data: fetch and check LUFFY's training set and model.

    luffy-data openr1 --out data/
        Elliott/Openr1-Math-46k-8192 (datasets) -> data/openr1.parquet, upstream's valid.parquet -> data/valid.parquet
    luffy-data model Elliott/Qwen2.5-Math-7B-16k-think --out models/Qwen2.5-Math-7B-16k-think
        huggingface_hub download (a rerun keeps the complete files), then the checks: weights, context length,
        chat template

Progress goes to stdout (the download bars of huggingface_hub / datasets to stderr); the last line of stdout is a
JSON summary. Exit codes: 0 done; 1 the model is there but fails a check (the message says which); 2 the input
is not available (offline without a local copy, an unknown id or path: one line on stderr saying what to
download and where to put it) or is malformed (the first bad rows are listed; nothing is written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from luffy_megatron.data.errors import DataError
from luffy_megatron.data.hub import (
    MODEL_ID,
    OPENR1_ID,
    RECIPE_CONTEXT,
    VALID_URL,
    Unavailable,
    check_model,
    fetch_model,
    prepare_openr1,
)


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_openr1(args: argparse.Namespace) -> int:
    summary = prepare_openr1(args.source, args.out, valid=args.valid, skip_bad_rows=args.skip_bad_rows, say=_say)
    print(json.dumps(summary))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    path = fetch_model(args.source, args.out, revision=args.revision, say=_say)
    report = check_model(path, need_context=args.need_context)
    length = report.max_position_embeddings
    _say(f"model: {path} ({report.weight_files} weight files)")
    _say(
        f"context: max_position_embeddings={length}, recipe needs {args.need_context}: "
        f"{'covered' if report.context_ok else 'NOT covered'}"
    )
    if report.chat_template == "model":
        _say("chat template: the model's own; its generation prompt ends with <think>\\n as the rewards need")
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.problems:
        print(f"error: {line}", file=sys.stderr)
    print(json.dumps(report.as_dict()))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luffy-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser(
        "openr1",
        help="LUFFY's training set -> <out>/openr1.parquet, and <out>/valid.parquet",
        description="Load LUFFY's training set, check every row as the trainer does, write <out>/openr1.parquet "
        "(every column as upstream has it) and copy the validation set to <out>/valid.parquet. Malformed rows: "
        "nothing is written and the first few are listed (row index, field), unless --skip-bad-rows.",
    )
    data.add_argument("--out", required=True, help="output folder (openr1.parquet, valid.parquet)")
    data.add_argument(
        "--source",
        default=OPENR1_ID,
        help=f"a Hugging Face data set id (default {OPENR1_ID}), a folder (`hf download ... --repo-type dataset "
        "--local-dir`, or Dataset.save_to_disk) or a parquet file",
    )
    data.add_argument(
        "--valid",
        help=f"the validation parquet to copy (upstream's data/valid.parquet: {VALID_URL}); "
        "default: the shared copy of it when this checkout has one",
    )
    data.add_argument("--skip-bad-rows", action="store_true", help="drop malformed rows (counted) instead of failing")
    data.set_defaults(func=cmd_openr1)

    model = sub.add_parser(
        "model",
        help="download a model (or take a local folder) and check it for the recipe",
        description="Download a model with huggingface_hub (run again after an interruption, it keeps the "
        "files already complete) or take a local folder, then check: weights present, max_position_embeddings "
        "covers prompt + response, and the chat template ends the generation prompt with <think>\\n (otherwise "
        "the trainer uses its default ChatML + <think> template, reported as a warning).",
    )
    model.add_argument("source", help=f"a Hugging Face model id (LUFFY's: {MODEL_ID}) or a local model folder")
    model.add_argument("--out", help="download folder (required for a Hub id; a local folder is checked in place)")
    model.add_argument("--revision", help="a branch, tag or commit of the Hub repository")
    model.add_argument(
        "--need-context",
        type=int,
        default=RECIPE_CONTEXT,
        help=f"positions the recipe needs: data.max_prompt_length + data.max_response_length (default "
        f"{RECIPE_CONTEXT} = 1024 + 8192, the main recipe)",
    )
    model.set_defaults(func=cmd_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Unavailable as exc:
        print(f"luffy-data {args.command}: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"luffy-data {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
