"""Reward grading throughput: RewardPool with 2 workers vs 1 worker on the same unique items.

    python tools/bench/reward.py [--num-items 400] [--repeats 1]

Items are (response, gold) pairs in LUFFY's training form (a thought, "</think>", a \\boxed answer,
the EOS text) graded by "luffy_think". Every gold and answer is distinct (random fractions written
unreduced, random polynomials written factored, some wrong), so no parse cache can help; the same list
is graded by both pools, each in fresh processes. Pool start-up is excluded: each pool is warmed on
other items first. The rounds alternate 1 and 2 workers and keep the best of each, because a shared
2-core machine's other jobs otherwise decide the ratio. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from luffy_megatron.reward import RewardPool

THOUGHT = (
    "Let me set up the problem carefully. I will simplify step by step and check the result by substituting a value. "
) * 4


def make_items(num_items: int, seed: int) -> list[tuple[tuple[str, str], float]]:
    """((response, gold), expected reward) pairs, all distinct."""
    rnd = random.Random(seed)
    items, seen = [], set()
    while len(items) < num_items:
        correct = rnd.random() < 0.75
        if len(items) % 2 == 0:  # a fraction, answered unreduced
            num, den = rnd.randint(1, 10**6), rnd.randint(2, 10**6)
            factor = rnd.randint(2, 9)
            gold = f"\\frac{{{num}}}{{{den}}}"
            answer = f"\\frac{{{num * factor}}}{{{den * factor + (0 if correct else 1)}}}"
        else:  # a polynomial, answered factored
            a, b = rnd.randint(1, 999), rnd.randint(1, 999)
            gold = f"{a}x^2 + {b}x"
            answer = f"x({a}x+{b if correct else b + 1})"
        if gold in seen:
            continue
        seen.add(gold)
        response = f"{THOUGHT}So the value is {answer}.\n</think>\n\nThe answer is $\\boxed{{{answer}}}$.<|endoftext|>"
        items.append(((response, gold), 1.0 if correct else 0.0))
    return items


def items_per_s(num_workers: int, items, expected, warmup) -> float:
    with RewardPool(num_workers=num_workers, timeout_s=10.0, grader="luffy_think") as pool:
        pool.grade(warmup)  # start-up, imports and lazy set-up happen here, outside the timing
        last_print = [0.0]

        def progress(num_done: int, num_total: int) -> None:
            if time.monotonic() - last_print[0] > 2.0 or num_done == num_total:
                print(
                    f"[bench reward] {num_workers} worker(s): {num_done}/{num_total} graded "
                    f"({time.monotonic() - start:.1f} s)",
                    flush=True,
                )
                last_print[0] = time.monotonic()

        start = time.monotonic()
        scores = pool.grade(items, progress=progress)
        elapsed_s = time.monotonic() - start
        if scores != expected:
            wrong = sum(s != e for s, e in zip(scores, expected))
            raise SystemExit(f"{wrong} of {len(items)} items graded differently from their construction")
        if pool.stats.timed_out or pool.stats.crashed:
            raise SystemExit(f"unexpected timeouts/crashes: {pool.stats}")
    return len(items) / elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-items", type=int, default=400)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of (1 worker, 2 workers), each with fresh pools; the best of each is kept",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pairs = make_items(args.num_items + 16, args.seed)
    items, expected = [p for p, _ in pairs[: args.num_items]], [e for _, e in pairs[: args.num_items]]
    warmup = [p for p, _ in pairs[args.num_items :]]
    load_start = os.getloadavg()[0]  # other jobs on the machine skew the ratio; reported with it
    print(
        f"[bench reward] {len(items)} unique items ({sum(expected):.0f} correct), "
        f"{os.cpu_count()} CPUs, load average {load_start:.2f}",
        flush=True,
    )
    rates = {1: 0.0, 2: 0.0}
    for round_index in range(args.repeats):  # interleaved, so that load from other jobs hits both alike
        for num_workers in (1, 2):
            rate = items_per_s(num_workers, items, expected, warmup)
            rates[num_workers] = max(rates[num_workers], rate)
            print(
                f"[bench reward] round {round_index + 1}/{args.repeats}, {num_workers} worker(s): {rate:.1f} items/s",
                flush=True,
            )
    print(
        json.dumps(
            {
                "num_items": len(items),
                "items_per_s_1w": round(rates[1], 1),
                "items_per_s_2w": round(rates[2], 1),
                "workers_speedup_ratio": round(rates[2] / rates[1], 2),
                "repeats": args.repeats,
                "load_average_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
