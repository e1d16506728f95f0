#!/usr/bin/env bash
# Install what Beyond needs on a fresh Debian machine, idempotently (`make up` runs it plain,
# `make test` with --test):
#   - a Python 3.11 virtualenv in .venv with the project (torch pinned)
#   - redis-server from Debian when it is missing
#   - a check that Java 17+ (TorchServe's frontend) is present
#   - the demo models' TorchServe archives, from the shipped weights (seconds, cached)
# and with --test also:
#   - the dev extras (pytest, the reference libraries, load and deployment tools)
#   - Go with sprig and yaml.v2 from Debian (the Helm chart tests render the chart with them)
set -euo pipefail
cd "$(dirname "$0")/.."
for_tests=""
[ "${1:-}" = "--test" ] && for_tests=1
started=$SECONDS
step() { printf '[%4d s] %s\n' "$((SECONDS - started))" "$*"; }

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"'

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
    step "installing redis-server (Debian)"
    apt_install redis-server
fi
# the init script of the Debian package may start a system redis on 6379: we run our own
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

# Go's text/template with sprig renders the Helm chart offline in tests/deploy (no helm binary)
if [ -n "$for_tests" ] && { ! command -v go >/dev/null 2>&1 \
    || [ ! -d /usr/share/gocode/src/github.com/Masterminds/sprig ] \
    || [ ! -d /usr/share/gocode/src/gopkg.in/yaml.v2 ]; }; then
    step "installing Go and sprig (Debian) for the Helm chart tests"
    apt_install golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev
fi

if ! command -v java >/dev/null 2>&1; then
    step "installing Java 17 (TorchServe's frontend)"
    apt_install openjdk-17-jre-headless
fi
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
if [ "${java_major:-0}" -lt 17 ]; then
    echo "TorchServe needs Java 17 or newer, found ${java_major:-none}" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# a stamp per level, redone when the project's dependencies change
stamp=.venv/.beyond-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
    step "installing the Python packages into .venv (torch, TorchServe, the service; first run: about 2 minutes) ..."
    .venv/bin/pip install -q --upgrade pip
    # what we ship is pinned by requirements.lock (make lock)
    .venv/bin/pip install -q -c requirements.lock -e .
    touch "$stamp"
fi
dev_stamp=.venv/.beyond-installed-dev
if [ -n "$for_tests" ] && { [ ! -f "$dev_stamp" ] || [ "$stamp" -nt "$dev_stamp" ]; }; then
    step "installing the test tools into .venv (the dev extras) ..."
    # the dev tools resolve around the pinned runtime
    .venv/bin/pip install -q -c requirements.lock -e ".[dev]"
    # test reference only: torchattacks pins requests~=2.25 (conflicts with locust and carries
    # known CVEs), so it is installed without its dependencies (torch, scipy, ... are ours)
    .venv/bin/pip install -q --no-deps torchattacks==3.5.1
    touch "$dev_stamp"
fi

step "generating the demo datasets (first run: about 30 s) ..."
.venv/bin/python -m model_store.train --datasets
step "archiving the demo models ..."
.venv/bin/python -m model_store.build --demo
step "installed"
