# Shared by the reproduce scripts: run oodbench from the repository's virtual environment on the GPU.
# Override with e.g. DEVICE=cuda:1, RUNS=/big/disk/runs, DATA=/datasets, PYTHON=python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-runs}
DATA=${DATA:-${OODBENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/oodbench/data}}   # oodbench's own default data root
mkdir -p reports/reproduce

oodbench() {  # oodbench <command> [args]: the CLI with this script's device, runs folder and data root
    local command=$1; shift
    if [ "$command" = bench ]; then
        "$PYTHON" -m oodbench bench "$@" --device "$DEVICE" --runs-dir "$RUNS" --data-root "$DATA"
    else
        "$PYTHON" -m oodbench "$command" "$@" --device "$DEVICE" --runs-dir "$RUNS" --data-root "$DATA"
    fi
}
