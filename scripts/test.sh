#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, types, and the test suite against a real broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
