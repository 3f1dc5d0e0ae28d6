"""`luffy-convert`: HF <-> megatron-core checkpoint conversion (one ordinary process)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from luffy_megatron.convert import tools


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="luffy-convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF model dir -> megatron-core distributed checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="target tensor parallel size (vocab padding, checks)")
    a.add_argument("--pp", type=int, default=1, help="target pipeline parallel size (checks)")
    a.add_argument("--vpp", type=int, default=None, help="target virtual pipeline size (checks)")
    a.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="checkpoint dtype (default: the HF weights' dtype)",
    )
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--quiet", action="store_true")
    b = sub.add_parser("megatron-to-hf", help="megatron-core distributed checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="checkpoint directory")
    b.add_argument("--hf-config", required=True, help="HF dir with config.json (+ tokenizer files)")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    b.add_argument(
        "--max-shard-size", type=_size, default="5G", help="safetensors shard size limit, e.g. 5G, 500M (default 5G)"
    )
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.command == "hf-to-megatron":
            tools.hf_to_megatron(
                args.hf,
                args.out,
                tp=args.tp,
                pp=args.pp,
                vpp=args.vpp,
                dtype=args.dtype,
                overwrite=args.overwrite,
                quiet=args.quiet,
            )
        else:
            tools.megatron_to_hf(
                args.ckpt,
                args.hf_config,
                args.out,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
                quiet=args.quiet,
            )
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"luffy-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
