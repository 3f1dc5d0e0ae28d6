#!/usr/bin/env python
"""Check the project's algorithm core against reference vectors produced by upstream LUFFY.

    python tools/check_reference_vectors.py ../shared/reference/luffy_test_vectors.json

For every result `<case>/<config>` in the file it builds float32
tensors from `inputs[case]`, computes advantages and one micro-batch loss with the project's own
functions and the config's upstream options, calls backward, and compares the advantages, every
reported metric scalar (including `loss_backward`), `grad_log_prob` and `grad_entropy` (where present)
at rtol 1e-5. `<case>/target_probs` is the case's `luffy_main` run with the stored teacher
probabilities in the off-policy ratio. Any number of prompts, rows per group and widths works.
Prints one line per mismatch and a final `N/M results match`; exits 0 only when all match.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from luffy_megatron.algo import advantage_options, compute_advantages, loss_options, microbatch_policy_loss  # noqa: E402
from luffy_megatron.config import AlgoConfig  # noqa: E402

RTOL = 1e-5
ATOL = 1e-7  # float32 round-off on values that are exactly 0 in the reference
TARGET_PROBS = "target_probs"
# Metrics upstream leaves NaN (0/0) when their side has no token; the project reports 0 there (a side may be
# empty in any micro-batch: upstream issue #24), so an expected NaN of these means 0.
ZERO_WHEN_EMPTY = ("off_ratio_max_clip_frac", "off_ratio_min_clip_frac", "on_pg_loss", "on_pg_clipfrac", "ppo_kl")


def _close(got: float, want: float) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return want is None and got is None or (got is not None and math.isnan(got))
    return got is not None and not math.isnan(got) and abs(got - want) <= ATOL + RTOL * abs(want)


def _tensors(inputs: dict) -> dict:
    f32 = lambda k: torch.tensor(inputs[k], dtype=torch.float32)  # noqa: E731
    t = {
        "response_mask": torch.tensor(inputs["response_mask"], dtype=torch.float32).long(),
        "prefix_mask": torch.tensor(inputs["prefix_mask"]).bool(),
        "token_level_rewards": f32("token_level_rewards"),
        "log_prob": f32("log_prob"),
        "old_log_prob": f32("old_log_prob"),
        "entropy": f32("entropy"),
        "index": list(inputs["index"]),
    }
    for k in ("ref_log_prob", "target_probs"):
        if k in inputs:
            t[k] = f32(k)
    return t


def run_one(inputs: dict, settings: dict, *, use_target_probs: bool) -> dict:
    """Advantages, loss and gradients for one (case, config), with the project's functions; `settings` is the
    config's upstream flat option dict."""
    algo = AlgoConfig.from_upstream(settings)
    t = _tensors(inputs)
    width = t["response_mask"].shape[-1]
    advantages = compute_advantages(
        token_level_rewards_BT=t["token_level_rewards"],
        response_mask_BT=t["response_mask"],
        prefix_mask_BT=t["prefix_mask"],
        group_ids=t["index"],
        **advantage_options(algo),
    )
    log_prob = t["log_prob"].clone().requires_grad_(True)
    entropy = t["entropy"].clone().requires_grad_(True)
    loss, metrics = microbatch_policy_loss(
        log_prob_BT=log_prob,
        entropy_BT=entropy,
        old_log_prob_BT=t["old_log_prob"],
        advantages_BT=advantages,
        response_mask_BT=t["response_mask"],
        prefix_mask_BT=t["prefix_mask"],
        max_response_length=width,
        ref_log_prob_BT=t.get("ref_log_prob"),
        target_probs_BT=t["target_probs"] if use_target_probs else None,
        **loss_options(algo),
    )
    loss.backward()
    return {
        "outputs": {k: float(v) for k, v in metrics.items()},
        "advantages_col0": advantages[:, 0].tolist(),
        "grad_log_prob": log_prob.grad.tolist(),
        "grad_entropy": entropy.grad.tolist(),
    }


def _flat(x) -> list:
    if isinstance(x, list):
        return [v for item in x for v in _flat(item)]
    return [x]


def compare(name: str, got: dict, want: dict) -> list[str]:
    problems = []
    for key, value in want.get("outputs", {}).items():
        g = got["outputs"].get(key)
        if key in ZERO_WHEN_EMPTY and isinstance(value, float) and math.isnan(value):
            value = 0.0
        if not _close(g, value):
            problems.append(f"{name}: outputs.{key} = {g!r}, expected {value!r}")
    for field in ("advantages_col0", "grad_log_prob", "grad_entropy"):
        if field not in want:
            continue
        g, w = _flat(got[field]), _flat(want[field])
        if len(g) != len(w):
            problems.append(f"{name}: {field} has {len(g)} values, expected {len(w)}")
            continue
        bad = [i for i, (a, b) in enumerate(zip(g, w)) if not _close(a, b)]
        if bad:
            i = bad[0]
            problems.append(
                f"{name}: {field} differs at {len(bad)} of {len(w)} positions (first: index {i}: {g[i]!r} vs {w[i]!r})"
            )
    return problems


def check_file(path: str | Path) -> tuple[int, int, list[str]]:
    data = json.loads(Path(path).read_text())
    inputs, configs, results = data["inputs"], data["configs"], data["results"]
    matched, problems = 0, []
    for name, want in results.items():
        case, _, config_name = name.partition("/")
        if case not in inputs:
            problems.append(f"{name}: no inputs for case {case!r}")
            continue
        if config_name in configs:
            settings = configs[config_name]
            use_target_probs = bool(settings.get("use_off_policy_probs", False))
        elif config_name == TARGET_PROBS and "luffy_main" in configs:
            settings, use_target_probs = configs["luffy_main"], True
        else:
            problems.append(f"{name}: no config named {config_name!r}")
            continue
        try:
            got = run_one(inputs[case], settings, use_target_probs=use_target_probs)
        except Exception as exc:  # noqa: BLE001 - report and go on: one broken case must not hide the others
            problems.append(f"{name}: raised {type(exc).__name__}: {exc}")
            continue
        mismatches = compare(name, got, want)
        problems += mismatches
        matched += not mismatches
    return matched, len(results), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("path", help="reference vectors JSON (format of shared/reference/luffy_test_vectors.json)")
    args = parser.parse_args(argv)
    matched, total, problems = check_file(args.path)
    for line in problems:
        print(line)
    print(f"{matched}/{total} results match")
    return 0 if matched == total and total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
