#!/usr/bin/env bash
# Set up (if needed) and run the whole pipeline on an embedded broker with a live view.
# Extra arguments go to `streamrec demo` (e.g. --duration 120).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamrec demo "$@"
