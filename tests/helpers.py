"""Small shared test helpers (paths to the repo and to the read-only shared/ folder)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LUFFY_SHARED_DIR", REPO.parent / "shared"))
PYTHON = REPO / ".venv" / "bin" / "python"
