#!/usr/bin/env bash
# The offline quick benchmark: every detector family at its quick preset on Fashion-MNIST vs digits,
# vertically flipped Fashion-MNIST, gaussian and uniform noise. Minutes on a laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/oodbench bench quick "$@"
