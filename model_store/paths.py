"""Where the demo data, trained weights and built archives live (all git-ignored).

``BEYOND_MODEL_STORE_DIR`` moves the whole tree (e.g. to a persistent volume).
"""

import os
from pathlib import Path

ROOT = Path(os.environ.get("BEYOND_MODEL_STORE_DIR", Path(__file__).resolve().parent))
DATA_DIR = ROOT / "data"
WEIGHTS_DIR = ROOT / "weights"
ARCHIVE_DIR = ROOT / "archives"
