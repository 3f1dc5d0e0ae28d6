"""tools/tensorboard_screenshot.py without a browser: what it refuses, the dashboard it opens, its default run."""

import urllib.parse

from tools import tensorboard_screenshot as shot


def test_a_run_without_events_is_refused_naming_what_to_do(tmp_path, capsys):
    assert shot.main(["--run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert f"no TensorBoard events under {tmp_path}" in err and "make demo" in err and "RUN=" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_chromium_is_named(monkeypatch):
    monkeypatch.setattr(shot.shutil, "which", lambda name: None)
    try:
        shot.find_chromium()
    except shot.ScreenshotError as err:
        assert "apt-get install --no-install-recommends chromium" in str(err)
    else:
        raise AssertionError("find_chromium found a browser with none on PATH")


def test_dashboard_url_and_default_run():
    url = shot.dashboard_url("http://127.0.0.1:6006", shot.DEFAULT_TAGS)
    assert url.startswith("http://127.0.0.1:6006/#scalars&_smoothingWeight=0&")
    assert urllib.parse.unquote(url.split("tagFilter=", 1)[1]) == shot.DEFAULT_TAGS
    for name in ("critic/score/mean", "actor/entropy", "timing_s/step", "perf/throughput", "val/test_score/"):
        assert name in shot.DEFAULT_TAGS
    assert shot.default_run_dir() == shot.REPO / "outputs" / "cpu_demo"  # recipes/cpu_demo.yaml, as `make demo`
