"""TensorBoard for real: a run's logs written by MetricsLogger, served by the venv's `tensorboard` on
loopback (one server per module, stopped by its pid), read back over HTTP."""

import urllib.parse

import pytest

from tools.tensorboard_screenshot import TensorBoard

pytestmark = pytest.mark.e2e

READY_TIMEOUT_S = 60
RUN = "tensorboard"  # MetricsLogger's directory under the run's output dir, as the trainer writes it
SCORES = [0.125, 0.25, 0.5, 0.625]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run's logs written by MetricsLogger, then `tensorboard --logdir <run> --host 127.0.0.1 --port <free>`
    (the venv's, in its own session; stopped by its pid when the module is done)."""
    import time

    from luffy_megatron.config import load_config
    from luffy_megatron.metrics.sinks import MetricsLogger

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["trainer.total_training_steps=4", f"trainer.output_dir={out}"])
    logger = MetricsLogger(out / RUN, out / "metrics.jsonl", total_steps=4, console=False, config=cfg)
    for step, score in enumerate(SCORES, start=1):
        logger.log(step, {"critic/score/mean": score, "actor/entropy": 2.0 / step, "timing_s/step": 3.0 + step})
    logger.close()
    t0 = time.monotonic()
    with TensorBoard(out, ready_timeout_s=READY_TIMEOUT_S) as tb:
        yield tb, time.monotonic() - t0
    assert tb.proc.poll() is not None  # stopped


def test_scalar_tags_are_served(served):
    tb, ready_s = served
    assert tb.get("/data/runs") == [RUN]
    tags = tb.get("/data/plugin/scalars/tags")
    assert set(tags[RUN]) == {"critic/score/mean", "actor/entropy", "timing_s/step"}
    assert ready_s < READY_TIMEOUT_S


def test_a_scalar_series_reads_back_what_was_logged(served):
    tb, _ = served
    query = urllib.parse.urlencode({"run": RUN, "tag": "critic/score/mean"})
    points = tb.get(f"/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
    assert [p[1] for p in points] == [1, 2, 3, 4]
    assert [p[2] for p in points] == pytest.approx(SCORES)  # written as float32: these are exact in it
    assert all(p[2] == s for p, s in zip(points, SCORES))


def test_the_config_text_is_served(served):
    tb, _ = served
    tags = tb.get("/data/plugin/text/tags")
    assert "config/text_summary" in tags[RUN]
    query = urllib.parse.urlencode({"run": RUN, "tag": "config/text_summary"})
    entries = tb.get(f"/data/plugin/text/text?{query}")
    assert entries[0]["step"] == 0 and "total_training_steps: 4" in entries[0]["text"]
