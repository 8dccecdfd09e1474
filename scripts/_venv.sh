# Sourced by demo.sh and test.sh: make .venv (Python 3.11 preferred) and install trainguard.
# Usage: source scripts/_venv.sh [EXTRAS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    PY="$(command -v python3.11 || command -v python3)"
    echo "creating .venv with $PY" >&2
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
# torch first and pinned: the CPU wheel on local disk. A bare "torch" would pull CUDA (GBs).
"$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0 numpy 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VPY" -c "import torch" || { echo "torch failed to install" >&2; exit 1; }
EXTRAS="${1:-}"
"$VPY" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VPY" -c "import trainguard" || { echo "trainguard failed to install" >&2; exit 1; }
