#!/usr/bin/env bash
# Set up and run the default test suite (a few minutes on 2 CPU cores). Slow checks: ./scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
