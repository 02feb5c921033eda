#!/usr/bin/env bash
# GPU readiness check (issue 18): training images/s and MFU per backbone, 2 Ray Train workers on one
# GPU, the ensemble stacked against a loop, Serve's overhead on the GPU; one JSON file.
#
#   benchmarks/gpu_check.sh [--out gpu_check.json]     # on one GPU: under 8 minutes
#   benchmarks/gpu_check.sh --dry-run --out x.json     # on the CPU, tiny: a check that it runs
#
# Options: benchmarks/gpu_check.sh --help. The logic is in benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../.venv/bin/python"
if [[ ! -x "$python" ]]; then
    python="$(command -v python || command -v python3 || true)"
    [[ -n "$python" ]] || { echo "gpu_check.sh: no .venv/bin/python in the repository and no python on PATH" >&2; exit 127; }
fi
exec "$python" "$here/gpu_check.py" "$@"
