"""How long a newcomer waits: ``make up`` on a fresh clone, to the first prediction and
explanation.

Clones this repository (its committed ``HEAD``) into a new folder, runs ``make up`` there on
free ports, and as soon as the gateway prints its key, asks it for one prediction and one
gradient explanation of a demo test image on every demo model. Prints the time of each
step of ``make up`` (its own ``[  t s]`` lines), of the first answers, and of every demo
model's first answer; then stops the stack and removes the clone.

    python -m benchmarks.first_answer              # a fresh .venv too: the full first run
    python -m benchmarks.first_answer --reuse-venv # with this checkout's .venv (the stack alone)

Machine-wide installs (redis-server, Java) are not undone: on a machine without them the
first run also spends the time apt takes.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from model_store.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["shapes-resnet", "shapes-vgg", "shapes-resnet-fair", "shapes-resnet-faint"]


def _image() -> bytes:
    """A demo-like picture: a magenta disc on a blue sky, 64x64 PNG (no dataset needed)."""
    yy, xx = np.mgrid[:64, :64]
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[...] = (90, 150, 230)
    picture[(yy - 30) ** 2 + (xx - 34) ** 2 < 160] = (225, 40, 215)
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return out.getvalue()


def _answers(base: str, key: str, model: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    files = {"image": ("disc.png", _image(), "image/png")}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
        client.post(f"/v1/models/{model}/predict", files=files).raise_for_status()
        client.post(f"/v1/models/{model}/explain", files=files, data={"method": "gradient"}).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse-venv", action="store_true", help="link this checkout's .venv into the clone")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="beyond-first-answer-"))
    clone = work / "beyond"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if args.reuse_venv:
        shutil.copytree(ROOT / ".venv", clone / ".venv", symlinks=True)
        subprocess.run([str(clone / ".venv" / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(clone)], check=True)
    port = free_port()
    env = {**os.environ, "BEYOND_PORT": str(port), "BEYOND_REDIS_PORT": str(free_port()),
           "BEYOND_TORCHSERVE_PORT": str(free_port()), "BEYOND_TORCHSERVE_MANAGEMENT_PORT": str(free_port()),
           "BEYOND_TORCHSERVE_METRICS_PORT": str(free_port()), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    start = time.monotonic()
    stack = subprocess.Popen(["make", "up"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    key: list[str] = []
    ready = threading.Event()

    def read_output() -> None:
        assert stack.stdout is not None
        for line in stack.stdout:
            print(f"  {time.monotonic() - start:6.1f} s | {line.rstrip()}", flush=True)
            found = re.search(r"API key:\s+(\S+)", line)
            if found:
                key.append(found.group(1))
                ready.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        if not ready.wait(args.timeout):
            raise SystemExit(f"make up printed no API key within {args.timeout:.0f} s")
        base = f"http://127.0.0.1:{port}"
        times = {}
        for model in MODELS:
            _answers(base, key[0], model)
            times[model] = time.monotonic() - start
        print(f"\nfirst prediction and explanation after {times[MODELS[0]]:.0f} s ({MODELS[0]})")
        print(f"every demo model answered after {max(times.values()):.0f} s")
    finally:
        subprocess.run(["make", "down"], cwd=clone, env=env, check=False, capture_output=True)
        os.killpg(stack.pid, 15)
        stack.wait(60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
