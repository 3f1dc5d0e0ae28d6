#!/usr/bin/env python
"""Write demo training data in LUFFY's parquet format.

    # synthetic arithmetic with worked <think> traces (quote '*' for the shell)
    python tools/prepare_data.py synthetic --out data/arith --num-train 2000 --num-val 200 \\
        --digits 2..4 --operands 2..3 --ops + - '*' --seed 0

    # MATH with the human solutions as demonstrations, every MATH-500 problem excluded
    python tools/prepare_data.py math --src ../shared/data/train/math_test5000.jsonl \\
        --math500 ../shared/data/eval/math500.jsonl --out data/math

Outputs ``train.parquet`` (with ``target``) and, for ``synthetic``, ``val.parquet`` (without), each written to a
temporary name and renamed into place. Counts are printed, the last line as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from luffy_megatron.data import DataError, shared_dir, write_luffy_parquet  # noqa: E402
from luffy_megatron.data.prompts import SYSTEM_PROMPTS  # noqa: E402


def int_range(text: str) -> tuple[int, int]:
    """``"3"`` -> (3, 3); ``"2..4"`` (or ``"2-4"``) -> (2, 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:(?:\.\.|-)\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected N or MIN..MAX, got {text!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r}: MIN > MAX")
    return low, high


def parse_ops(values: list[str]) -> tuple[str, ...]:
    ops: list[str] = []
    for value in values:
        for op in value.replace(",", " ").split():
            op = {"x": "*", "×": "*", "−": "-"}.get(op, op)
            if op not in ("+", "-", "*"):
                raise SystemExit(f"--ops: unknown operator {op!r} (use + - '*')")
            if op not in ops:
                ops.append(op)
    return tuple(ops)


def cmd_synthetic(args: argparse.Namespace) -> dict:
    from luffy_megatron.data.synthetic import ArithmeticConfig, generate_luffy_rows

    config = ArithmeticConfig(
        min_digits=args.digits[0],
        max_digits=args.digits[1],
        min_operands=args.operands[0],
        max_operands=args.operands[1],
        ops=parse_ops(args.ops),
    )
    train_rows, val_rows = generate_luffy_rows(
        args.num_train, args.num_val, config, seed=args.seed, system_prompt=SYSTEM_PROMPTS[args.system_prompt]
    )
    out = Path(args.out)
    summary = {"config": vars(config) | {"ops": list(config.ops)}, "seed": args.seed}
    summary["train"] = {"path": str(write_luffy_parquet(train_rows, out / "train.parquet")), "rows": len(train_rows)}
    if val_rows:
        summary["val"] = {"path": str(write_luffy_parquet(val_rows, out / "val.parquet")), "rows": len(val_rows)}
    print(f"synthetic: wrote {len(train_rows)} training rows and {len(val_rows)} validation rows to {out}")
    return summary


def cmd_math(args: argparse.Namespace) -> dict:
    from luffy_megatron.data.math_train import convert_math

    verify = None
    if args.verify:
        from luffy_megatron.reward.graders import score_luffy

        verify = score_luffy
    rows, stats = convert_math(
        args.src,
        None if args.math500 in (None, "", "none") else args.math500,
        system_prompt=SYSTEM_PROMPTS[args.system_prompt],
        verify=verify,
        skip_bad_rows=args.skip_bad_rows,
    )
    path = write_luffy_parquet(rows, Path(args.out) / "train.parquet")
    print(
        f"math: {stats.num_source_rows} source rows, excluded {stats.num_excluded_math500} MATH-500 problems "
        f"(of {stats.num_math500_problems}), skipped {sum(stats.skipped.values())} {dict(stats.skipped)}, "
        f"wrote {stats.num_written} rows to {path}"
    )
    return {"train": {"path": str(path), "rows": len(rows)}, **stats.as_dict()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser("synthetic", help="arithmetic problems with step-by-step <think> demonstrations")
    syn.add_argument("--out", required=True, help="output folder (train.parquet, val.parquet)")
    syn.add_argument("--num-train", type=int, default=1000)
    syn.add_argument("--num-val", type=int, default=100)
    syn.add_argument("--digits", type=int_range, default=(2, 4), help="digits per operand, N or MIN..MAX")
    syn.add_argument("--operands", type=int_range, default=(2, 3), help="operands per problem, N or MIN..MAX")
    syn.add_argument("--ops", nargs="+", default=["+", "-", "*"], help="operators: + - '*' (or '+,-,*')")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument(
        "--system-prompt",
        choices=sorted(SYSTEM_PROMPTS),
        default="luffy",
        help="luffy: LUFFY's system prompt (default); short: one line for tiny models; none",
    )
    syn.set_defaults(func=cmd_synthetic)

    default_shared = shared_dir() / "data"
    mth = sub.add_parser("math", help="MATH problems with the human solution as demonstration")
    mth.add_argument("--src", default=str(default_shared / "train" / "math_test5000.jsonl"))
    mth.add_argument(
        "--math500",
        default=str(default_shared / "eval" / "math500.jsonl"),
        help="MATH-500 jsonl whose problems are excluded ('none' to exclude nothing)",
    )
    mth.add_argument("--out", required=True, help="output folder (train.parquet)")
    mth.add_argument("--system-prompt", choices=sorted(SYSTEM_PROMPTS), default="luffy")
    mth.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep only rows whose demonstration passes LUFFY's reward against its own answer",
    )
    mth.add_argument("--skip-bad-rows", action="store_true", help="count and skip malformed source rows")
    mth.set_defaults(func=cmd_math)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "synthetic" and (args.num_train < 1 or args.num_val < 0):
        raise SystemExit("--num-train must be >= 1 and --num-val >= 0")
    try:
        summary = args.func(args)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
