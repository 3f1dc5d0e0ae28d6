#!/usr/bin/env python
"""Memory per GPU, FLOPs and step time of a recipe on N nodes, before asking for any GPU.

    python tools/plan.py recipes/luffy_main.yaml --nodes 8
    python tools/plan.py recipes/luffy_32b_16node.yaml --nodes 16 --gpu-memory-gib 80 \\
        --set actor.ppo_max_token_len_per_gpu=16384

The recipe is loaded as luffy-train loads it (luffy_megatron.config.load_config), so --set overrides work;
its parallel.nnodes is replaced by --nodes. Exit status: 0 when every phase fits, 1 when one does not (the
last lines name the largest term and what to change), 2 for a recipe or setting that cannot be planned.
What is modeled and assumed: docs/plan.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from luffy_megatron.config import ConfigError, load_config  # noqa: E402
from luffy_megatron.perf.flops import PlanError  # noqa: E402
from luffy_megatron.perf.memory_plan import Assumptions  # noqa: E402
from luffy_megatron.perf.report import format_plan, plan_with_suggestions  # noqa: E402

DEFAULTS = Assumptions()


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tools/plan.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    ap.add_argument(
        "--nodes",
        type=_positive(int),
        required=True,
        help="nodes of the trainer (replaces parallel.nnodes; cluster.layout=disaggregated adds "
        "cluster.rollout_nnodes)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as for luffy-train (repeatable)",
    )
    ap.add_argument(
        "--gpu-memory-gib",
        type=_positive(float),
        default=DEFAULTS.gpu_memory_gib,
        help=f"memory per GPU (default {DEFAULTS.gpu_memory_gib:g})",
    )
    ap.add_argument(
        "--reserve-gib",
        type=_nonnegative,
        default=DEFAULTS.reserve_gib,
        help="memory per GPU kept free: an 80 GB H100 shows CUDA ~79.6 GiB, and some allocations are "
        f"not modeled (default {DEFAULTS.reserve_gib:g})",
    )
    ap.add_argument(
        "--mfu",
        type=_fraction,
        default=DEFAULTS.mfu,
        help=f"model-FLOPs utilization of training, log-probs and prefill (default {DEFAULTS.mfu:g})",
    )
    ap.add_argument(
        "--peak-tflops",
        type=_positive(float),
        default=DEFAULTS.peak_tflops,
        help=f"dense bf16 TFLOP/s per GPU (default {DEFAULTS.peak_tflops:g}, H100 SXM)",
    )
    ap.add_argument(
        "--hbm-tbs",
        type=_positive(float),
        default=DEFAULTS.hbm_tbs,
        help=f"HBM bandwidth per GPU, TB/s (default {DEFAULTS.hbm_tbs:g}, H100 SXM)",
    )
    ap.add_argument(
        "--gen-bandwidth-util",
        type=_fraction,
        default=DEFAULTS.gen_bandwidth_util,
        help=f"share of the HBM bandwidth a decode step achieves (default {DEFAULTS.gen_bandwidth_util:g})",
    )
    ap.add_argument(
        "--mean-prompt-frac",
        type=_fraction,
        default=DEFAULTS.mean_prompt_frac,
        help=f"mean prompt length / data.max_prompt_length (default {DEFAULTS.mean_prompt_frac:g})",
    )
    ap.add_argument(
        "--mean-response-frac",
        type=_fraction,
        default=DEFAULTS.mean_response_frac,
        help="mean response (generated or demonstration) length / data.max_response_length "
        f"(default {DEFAULTS.mean_response_frac:g})",
    )
    ap.add_argument(
        "--nccl-nvls",
        action="store_true",
        help="plan the trainer's NCCL communicators with NVLS buffers (NCCL's default on H100 NVSwitch nodes); "
        "without it the plan assumes NCCL_NVLS_ENABLE=0 on the trainer ranks",
    )
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if any(o.split("=", 1)[0].strip() == "parallel.nnodes" for o in args.overrides):
        ap.error("parallel.nnodes is set by --nodes; drop --set parallel.nnodes=...")
    try:
        cfg = load_config(args.recipe, [f"parallel.nnodes={args.nodes}", *args.overrides])
        assumptions = Assumptions(
            gpu_memory_gib=args.gpu_memory_gib,
            reserve_gib=args.reserve_gib,
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            hbm_tbs=args.hbm_tbs,
            gen_bandwidth_util=args.gen_bandwidth_util,
            mean_prompt_frac=args.mean_prompt_frac,
            mean_response_frac=args.mean_response_frac,
            nccl_nvls=args.nccl_nvls,
        )
        plan = plan_with_suggestions(cfg, assumptions, recipe=args.recipe)
    except (ConfigError, PlanError) as err:
        print(
            f"tools/plan.py: error: {args.recipe}: {err}"
            if isinstance(err, PlanError)
            else f"tools/plan.py: error: {err}",
            file=sys.stderr,
        )
        return 2
    print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
