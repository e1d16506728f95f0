"""Where the demo data, weights and built archives live.

``DEMO_WEIGHTS_DIR`` holds the shipped demo weights (tracked in git, a few MB): every machine
serves and tests the same weights, whatever its CPU would have trained (``model_store.train``
with fixed seeds is not bit-reproducible across CPUs). ``BEYOND_DEMO_WEIGHTS_DIR`` points the
demo tests and archives at other weights of the same layout (``benchmarks.seeds`` uses it for
the seeds it retrains). Everything under ``ROOT`` is generated and git-ignored;
``BEYOND_MODEL_STORE_DIR`` moves it (e.g. to a persistent volume).
"""

import os
from pathlib import Path

DEMO_WEIGHTS_DIR = Path(os.environ.get("BEYOND_DEMO_WEIGHTS_DIR", Path(__file__).resolve().parent / "demo_weights"))
ROOT = Path(os.environ.get("BEYOND_MODEL_STORE_DIR", Path(__file__).resolve().parent))
DATA_DIR = ROOT / "data"
WEIGHTS_DIR = ROOT / "weights"
ARCHIVE_DIR = ROOT / "archives"
