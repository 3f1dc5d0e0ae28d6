"""tools/demo.py reports a bad setting as one line, as luffy-train does, before it writes or builds anything."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_bad_setting_is_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "demo.py"),
            "--set",
            "trainer.test_freq=0",
            "--set",
            f"trainer.output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("demo: error: ") and "trainer.test_freq=0 must be >= 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
