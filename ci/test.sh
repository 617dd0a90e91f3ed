#!/usr/bin/env bash
# The test command: sets up (ci/setup.sh: build tools, the project's virtual environment), lints, type-checks
# (mypy, configured in pyproject.toml's [tool.mypy]), then runs the default test tier (unit + integration, not
# slow) — ruff, mypy, pytest and the `amppatch` console script that integration tests spawn all come from the
# venv, whose bin/ goes first on PATH.
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m slow` for the heavy tier.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash ci/setup.sh)
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
unset PYTHONHOME
"$venv/bin/python" -m ruff check amppatch tests bench
"$venv/bin/python" -m mypy
exec "$venv/bin/python" -m pytest "$@"
