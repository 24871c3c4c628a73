"""Where the shared reference fixtures are: `../shared` beside the checkout (override: TCMU_OBD_SHARED)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("TCMU_OBD_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURES_OBD = SHARED_DIR / "fixtures" / "obd"
FIXTURES_UPSTREAM = SHARED_DIR / "fixtures" / "upstream"
