"""RewardPool: worker processes, hard per-item deadline, crash replacement, results in input order."""

import os
import signal
import time

import pytest

from luffy_megatron.reward import GradingError, RewardPool, score_choice, score_luffy, score_math

TOWER = "\\boxed{9^{9^{9^{9}}}}"  # math-verify's own timeouts need ~5 s per comparison on it


# Test-only graders, reached by the workers as "test_reward_pool:<name>" (pytest puts tests/unit on
# sys.path, and the workers inherit the parent's sys.path).
def crash_on_marker(response, ground_truth):
    if "CRASH" in response:
        os._exit(3)  # like a segfault: no exception, no reply
    return score_math(response, ground_truth)


def killed_once_on_marker(response, ground_truth):
    """SIGKILLs its own worker the first time it sees "KILLONCE <marker file>" (as a kill from outside would),
    grades normally once the marker exists."""
    if response.startswith("KILLONCE"):
        marker = response.split()[1]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        response = response.split(None, 2)[2]
    return score_math(response, ground_truth)


def hang_on_marker(response, ground_truth):
    if response.startswith("HANG"):
        time.sleep(30)  # far past every deadline used here; a broken deadline shows as a slow test
    return score_math(response[-200:], ground_truth)


def mixed_batch(num_items=24):
    """(response, gold) pairs for the luffy_think grader whose scores follow no simple pattern."""
    items = []
    for i in range(num_items):
        answer = i * i if i % 3 else i * i + 1  # every third one wrong
        think_close = "</think>" if i % 5 else ""  # every fifth one a format failure
        items.append(
            (
                f"{i}*{i} is {i * i}, so \\boxed{{{i * i}}}.{think_close} Final: \\boxed{{{answer}}}<|endoftext|>",
                str(i * i),
            )
        )
    return items


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=2.0, grader="luffy_think") as reward_pool:
        yield reward_pool


def test_results_equal_in_process_grading_in_input_order(pool):
    items = mixed_batch()
    expected = [0.0 if i % 5 == 0 or i % 3 == 0 else 1.0 for i in range(len(items))]
    assert [score_luffy(response, gold) for response, gold in items] == expected
    graded_before = pool.stats.graded
    assert pool.grade(items) == expected
    assert pool.stats.graded - graded_before == len(items)
    # Per-call grader override; results still in input order.
    choices = [("ANSWER: B", "B"), ("\\boxed{C}", "A"), ("answer is (d)", "D"), ("none", "E")]
    assert pool.grade(choices, grader="choice") == [score_choice(r, g) for r, g in choices] == [1.0, 0.0, 1.0, 0.0]


def test_pathological_items_cost_at_most_the_deadline_and_the_rest_is_graded(pool):
    items = mixed_batch(22)
    expected = pool.grade(items)
    for index in (3, 11):
        items[index] = ("Surely</think> it is " + TOWER, "1")
        expected[index] = 0.0
    before = pool.stats.timed_out, pool.stats.worker_restarts
    start = time.monotonic()
    progress = []
    assert pool.grade(items, progress=lambda done, total: progress.append((done, total))) == expected
    elapsed_s = time.monotonic() - start
    # Each tower holds one worker for at most timeout_s + grace_s = 2.5 s; with 2 workers the two towers
    # overlap, so ~2.5 s + a worker restart (~0.5 s) + the 20 normal items (<0.5 s). The bound
    # timeout_s * num_patho / num_workers + 5 s = 7 s leaves room for a loaded 2-core machine (measured:
    # 3.5 s idle, 5 s at load average 8). Without the kill math-verify's own 5 s timeouts would still
    # score the towers 0, inside the bound: timed_out == 2 is what shows the deadline at work.
    assert elapsed_s < 2.0 * 2 / 2 + 5.0, elapsed_s
    assert elapsed_s >= 2.0  # the deadline was waited for, not skipped
    assert (pool.stats.timed_out - before[0], pool.stats.worker_restarts - before[1]) == (2, 2)
    assert progress[-1] == (len(items), len(items))
    # Reusable after the kills.
    assert pool.grade(items[:6]) == expected[:6]


def test_a_hung_grader_is_killed_at_the_deadline(pool):
    # Sleeps 600 s unless killed: proves the hard deadline independently of math-verify's own timeouts.
    items = [("\\boxed{1}", "1"), ("HANG", "1"), ("\\boxed{2}", "3"), ("\\boxed{4}", "4")]
    start = time.monotonic()
    assert pool.grade(items, grader=f"{__name__}:hang_on_marker") == [1.0, 0.0, 0.0, 1.0]
    assert time.monotonic() - start < 2.0 + 0.5 + 3.0


def test_a_large_item_is_not_queued_behind_a_stuck_one(pool):
    # Queued behind "HANG", a 1 MB response would not fit in the pipe: the parent would block in send()
    # until the stuck worker reads again, and could not enforce the deadline meanwhile.
    big = "x" * 1_000_000 + " so \\boxed{7}"
    start = time.monotonic()
    assert pool.grade([("HANG", "1"), (big, "7"), ("\\boxed{2}", "2")], grader=hang_on_marker) == [0.0, 1.0, 1.0]
    assert time.monotonic() - start < 2.0 + 0.5 + 3.0


def test_an_item_that_crashes_two_workers_is_the_only_one_lost(pool):
    items = [(f"\\boxed{{{i}}}", str(i if i % 4 else i + 1)) for i in range(12)]
    expected = [1.0 if i % 4 else 0.0 for i in range(12)]
    items[5] = ("CRASH", "5")
    expected[5] = 0.0
    before = pool.stats.crashed, pool.stats.worker_restarts, pool.stats.regraded
    assert pool.grade(items, grader=crash_on_marker) == expected  # a function is passed by its import name
    assert (pool.stats.crashed - before[0], pool.stats.worker_restarts - before[1]) == (1, 2)
    assert pool.stats.regraded - before[2] == 1  # one more try, on a new worker
    assert pool.grade(items[:4], grader="math") == expected[:4]


def test_a_worker_killed_on_an_item_is_replaced_and_the_item_graded_again(pool, tmp_path):
    items = [(f"\\boxed{{{i}}}", str(i if i % 4 else i + 1)) for i in range(8)]
    expected = [1.0 if i % 4 else 0.0 for i in range(8)]
    items[3] = (f"KILLONCE {tmp_path / 'killed'} \\boxed{{3}}", "3")
    before = pool.stats.crashed, pool.stats.worker_restarts, pool.stats.regraded
    assert pool.grade(items, grader=killed_once_on_marker) == expected  # nothing lost
    assert (tmp_path / "killed").exists()
    assert (pool.stats.crashed - before[0], pool.stats.worker_restarts - before[1]) == (0, 1)
    assert pool.stats.regraded - before[2] == 1


def test_a_worker_killed_while_idle_is_replaced(pool):
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    time.sleep(0.2)
    restarts = pool.stats.worker_restarts
    items = mixed_batch(10)
    assert pool.grade(items) == [score_luffy(r, g) for r, g in items]
    assert pool.stats.worker_restarts == restarts + 1


def test_an_interrupted_batch_leaves_no_stale_work(pool):
    pool.grade([("\\boxed{1}", "1")])  # at least one worker is ready: "HANG" is in flight at the first progress
    items = [("HANG", "1")] + [(f"\\boxed{{{i}}}", str(i)) for i in range(7)]
    restarts = pool.stats.worker_restarts

    def interrupt(num_done, num_total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pool.grade(items, grader=hang_on_marker, progress=interrupt)
    # The worker stuck on "HANG" is replaced at once instead of answering (or timing out) into the next call.
    assert pool.stats.worker_restarts == restarts + 1
    start = time.monotonic()
    wrong = [(f"\\boxed{{{i}}}", str(i + 1)) for i in range(8)]
    assert pool.grade(wrong, grader="math") == [0.0] * 8
    assert pool.grade(wrong[:2], grader="math") == [0.0] * 2
    assert time.monotonic() - start < 2.0


def test_grader_errors_are_raised_not_scored(pool):
    with pytest.raises(GradingError, match=r"item 1: ValueError: multiple-choice ground truth"):
        pool.grade([("ANSWER: A", "A"), ("ANSWER: A", "42")], grader="choice")
    assert pool.grade([("ANSWER: A", "A")], grader="choice") == [1.0]  # still usable
    with pytest.raises(ValueError, match="unknown grader"):
        pool.grade([("x", "1")], grader="nope")


def test_close_stops_exactly_its_own_processes():
    with RewardPool(num_workers=2, timeout_s=5.0, grader="math") as own_pool:
        assert own_pool.grade([("\\boxed{1}", "1")]) == [1.0]
        pids = own_pool.worker_pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        own_pool.grade([("\\boxed{1}", "1")])


def test_in_process_mode_grades_the_same():
    items = mixed_batch(10)
    with RewardPool(num_workers=0, grader="luffy_think") as debug_pool:
        assert debug_pool.worker_pids == []
        assert debug_pool.grade(items) == [score_luffy(r, g) for r, g in items]
        assert debug_pool.stats.graded == len(items)


# The upstream case: math-verify reads "1/2<|endoftext|>" as 1 unless the special token is stripped.
EOS_ITEMS = [
    ("ok</think>So x = 1/2<|endoftext|>", "1"),
    ("ok</think>So x = 1/2<|endoftext|>", "\\frac{1}{2}"),
    ("ok</think>\\boxed{3}<|im_end|>", "3"),
]


def test_pool_grades_special_tokens_as_upstream_by_default_and_strips_on_request(pool):
    assert pool.strip_special_tokens is False
    assert pool.grade(EOS_ITEMS) == [1.0, 0.0, 1.0]
    with RewardPool(num_workers=1, timeout_s=5.0, grader="luffy_think", strip_special_tokens=True) as strip_pool:
        assert strip_pool.grade(EOS_ITEMS) == [0.0, 1.0, 1.0]  # in the worker process
        # The option reaches a per-call grader too.
        assert strip_pool.grade([("x = 1/2<|endoftext|>", "\\frac{1}{2}")], grader="math") == [1.0]
    assert pool.grade([("x = 1/2<|endoftext|>", "\\frac{1}{2}")], grader="math") == [0.0]
    with RewardPool(num_workers=0, grader="luffy_think", strip_special_tokens=True) as debug_pool:
        assert debug_pool.grade(EOS_ITEMS) == [0.0, 1.0, 1.0]


def test_strip_option_is_refused_for_a_grader_that_cannot_take_it(pool):
    with pytest.raises(ValueError, match="strip_special_tokens"):
        RewardPool(num_workers=1, grader=crash_on_marker, strip_special_tokens=True)
    with RewardPool(num_workers=0, grader="luffy_think", strip_special_tokens=True) as debug_pool:
        with pytest.raises(ValueError, match="strip_special_tokens"):
            debug_pool.grade([("x", "1")], grader=hang_on_marker)
    assert pool.grade([("\\boxed{4}", "4")], grader=hang_on_marker) == [1.0]  # without the option it is fine


def test_a_worker_killed_during_start_up_is_replaced_not_misdiagnosed():
    """A signal during a worker's start-up (before it reported ready) is a crash to recover from, not
    the 'guard your main module' import failure."""
    from luffy_megatron.reward.pool import RewardPool

    with RewardPool(num_workers=1, timeout_s=5.0, grader="math") as pool:
        os.kill(pool.worker_pids[0], signal.SIGKILL)  # immediately: the worker is still importing
        assert pool.grade([("\\boxed{2}", "2"), ("\\boxed{3}", "2")]) == [1.0, 0.0]
        assert pool.stats.worker_restarts >= 1
