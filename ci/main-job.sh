#!/usr/bin/env bash
# The main job on defaults, end to end, on a fresh machine: set up (ci/setup.sh: build tools, the project's
# virtual environment), then the venv's `amppatch run` — fetch llama.cpp, build it, synthetic 1.1B Q8_0
# model, profile, apply, tune, bake, final ab-test, report. Every stage is recorded in the run directory, so
# rerunning this script resumes where it stopped.
# Extra arguments go to `amppatch run` (e.g. --model PATH, --quick, --type q4_0 --repack 0, --budget 30).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash ci/setup.sh)
export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
unset PYTHONHOME
exec "$venv/bin/amppatch" run -o "${AMPPATCH_OUT:-amppatch-run}" "$@"
