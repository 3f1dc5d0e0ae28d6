#!/usr/bin/env python
"""`make tensorboard-screenshot [RUN=dir] [OUT=docs/tensorboard.png]`: a picture of a run's TensorBoard.

Serves RUN (a run's output directory, whose tensorboard/ holds the events; default: the demo run's
trainer.output_dir from recipes/cpu_demo.yaml) with the venv's `tensorboard` on 127.0.0.1, renders the scalars
dashboard with headless Chromium (the upstream/verl names a LUFFY user reads first, via the dashboard's tag
filter) and writes the PNG. The server is stopped by its pid afterwards.

    python tools/tensorboard_screenshot.py [--run DIR] [--out PNG] [--tags REGEX] [--size 1600,1400]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAGS = (
    "^(critic/score/mean|critic/advantages/mean|response_length/mean|actor/pg_loss|actor/entropy|"
    "actor/off_policy_prob|actor/grad_norm|val/test_score/.*|timing_s/step|perf/throughput|perf/mfu)$"
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


class ScreenshotError(RuntimeError):
    """A run directory without logs, no browser, or a server that did not come up; the message says what to do."""


def default_run_dir() -> Path:
    """trainer.output_dir of recipes/cpu_demo.yaml (what `make demo` writes), relative to the repository."""
    import yaml

    recipe = REPO / "recipes" / "cpu_demo.yaml"
    out = Path(yaml.safe_load(recipe.read_text())["trainer"]["output_dir"])
    return out if out.is_absolute() else REPO / out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    """`tensorboard --logdir LOGDIR --host 127.0.0.1 --port P` as a subprocess of this venv, in its own session
    so that stopping it (by its pid) stops whatever it started. `with TensorBoard(dir) as tb: tb.get(path)`."""

    def __init__(self, logdir: Path, *, port: int | None = None, ready_timeout_s: float = 60.0):
        self.logdir, self.port, self.ready_timeout_s = Path(logdir), port or _free_port(), ready_timeout_s
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "TensorBoard":
        exe = Path(sys.executable).parent / "tensorboard"
        if not exe.exists():
            raise ScreenshotError(f"{exe} does not exist: run `make setup` (requirements.txt installs tensorboard)")
        self._log = tempfile.NamedTemporaryFile("w+", prefix="tensorboard-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                str(exe),
                "--logdir",
                str(self.logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--reload_interval",
                "1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    def wait_ready(self) -> float:
        """Until /data/runs lists a run (the first scan of the logdir is asynchronous); bounded."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.ready_timeout_s:
            if self.proc.poll() is not None:
                raise ScreenshotError(f"tensorboard exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.get("/data/runs"):
                    return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        raise ScreenshotError(
            f"tensorboard on {self.base} listed no run of {self.logdir} within "
            f"{self.ready_timeout_s:g} s: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text()[-chars:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            os.unlink(self._log.name)
            self._log = None


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(
        "no headless Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "); on Debian: "
        "`sudo apt-get install --no-install-recommends chromium` (`make tensorboard-screenshot` "
        "installs it when run as root)"
    )


def screenshot(
    url: str, out_png: Path, *, chromium: str, size: tuple[int, int], budget_ms: int = 15000, timeout_s: float = 120.0
) -> Path:
    """Headless Chromium as platform notes section 6 runs it (throw-away profile, no network beyond loopback),
    written to a temporary name and renamed into place."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={tmp}",
            url,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"chromium did not finish the screenshot of {url} within {timeout_s:g} s") from None
    if proc.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
        raise ScreenshotError(f"chromium exited with {proc.returncode} without a screenshot: {proc.stderr[-2000:]}")
    tmp.replace(out_png)
    return out_png


def dashboard_url(base: str, tag_filter: str) -> str:
    """The scalars dashboard, tag filter set, no smoothing and no outlier clipping (a short run has few points)."""
    return (
        f"{base}/#scalars&_smoothingWeight=0&_ignoreYOutliers=false&tagFilter={urllib.parse.quote(tag_filter, safe='')}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument(
        "--run", default=None, help="a run's output directory (default: the demo run's, recipes/cpu_demo.yaml)"
    )
    ap.add_argument("--out", default=str(REPO / "docs" / "tensorboard.png"))
    ap.add_argument("--tags", default=DEFAULT_TAGS, help="the dashboard's tag filter (a regular expression)")
    ap.add_argument("--size", default="1600,1400", help="window width,height in pixels")
    args = ap.parse_args(argv)
    try:
        run = Path(args.run) if args.run else default_run_dir()
        events = sorted(run.rglob("events.out.tfevents.*")) if run.is_dir() else []
        if not events:
            raise ScreenshotError(
                f"no TensorBoard events under {run}: run `make demo` first, or pass RUN=<a run's trainer.output_dir>"
            )
        chromium = find_chromium()
        width, height = (int(v) for v in args.size.split(","))
        with TensorBoard(run) as tb:
            tags = {t for run_tags in tb.get("/data/plugin/scalars/tags").values() for t in run_tags}
            png = screenshot(dashboard_url(tb.base, args.tags), Path(args.out), chromium=chromium, size=(width, height))
    except ScreenshotError as err:
        print(f"tensorboard-screenshot: error: {err}", file=sys.stderr)
        return 1
    print(f"tensorboard-screenshot: {png} ({png.stat().st_size // 1024} KiB) of {run}: {len(tags)} scalar tags")
    return 0


if __name__ == "__main__":
    sys.exit(main())
