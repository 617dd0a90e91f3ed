#!/usr/bin/env bash
# The main job on defaults, end to end, on a fresh machine: set up, fetch llama.cpp, build it, make the
# synthetic 1.1B Q8_0 model, and measure token generation. Every stage is cached, so a rerun resumes.
# Output: everything lands in ${AMPPATCH_OUT:-amppatch-out}/; the last line printed is the result file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
out="${AMPPATCH_OUT:-amppatch-out}"
shape="${AMPPATCH_SHAPE:-1b}"
type="${AMPPATCH_TYPE:-q8_0}"
threads="${AMPPATCH_THREADS:-1}"
mkdir -p "$out"

repo=$(amppatch llama fetch | tail -n 1)
stock=$(amppatch build --repo "$repo" --name stock | tail -n 1)
model=$(amppatch model synth --shape "$shape" --type "$type" --build "$stock" | tail -n 1)
echo "main-job: tree $repo, build $stock, model $model" >&2
LD_LIBRARY_PATH="$stock/bin" "$stock/bin/llama-bench" -m "$model" -p 0 -n 32 -r 3 -t "$threads" -o jsonl \
    > "$out/stock-bench.jsonl"
python3 - "$out/stock-bench.jsonl" <<'PY' >&2
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(f"stock: {row['model_type']} {row['model_size'] / 1e9:.2f} GB, {row['n_threads']} thread(s): "
          f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f} tok/s")
PY
echo "$out/stock-bench.jsonl"
