#!/usr/bin/env bash
# The test command: sets up, lints, then runs the default test tier (unit + integration, not slow).
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m slow` for the heavy tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
python3 -m ruff check amppatch tests bench
python3 -m pytest "$@"
