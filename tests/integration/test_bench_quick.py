"""`python -m bench.compare --quick`: one configuration per code path, every arm, two rounds (slow tier).

The first run builds every arm (stock, no-AMX, gcc grid, PGO, the huge-page lever, amppatch) and runs the gcc
grid, the quick distance search and the rooflines; all of that is cached (builds by the build layer, decisions
in the bench work dir), so later runs only time. Results go to a temporary file; docs/RESULTS.md is not touched.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from bench import compare

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_bench_writes_one_row_per_configuration_and_arm(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert compare.main(["--quick", "--results", str(out), "--no-results-md"]) == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == compare.SCHEMA_VERSION
    assert data["options"]["quick"] is True
    rows = data["rows"]
    configs = {r["config"]["id"] for r in rows}
    assert configs == {c.id for c in compare.quick_configs()}
    for cid in configs:
        mine = {r["arm"]: r for r in rows if r["config"]["id"] == cid}
        assert set(mine) == set(compare.ARMS), f"{cid}: every arm has a row (measured or saying why not)"
        stock = mine["stock"]
        assert stock["median_tok_s"] > 0 and stock["ratio"] == 1.0
        # Bytes per token × tok/s can never exceed what a pure stream read reaches here.
        assert 0 < stock["ceiling_pct"] < 110
        for arm, row in mine.items():
            if arm == "stock":
                continue
            if row["median_tok_s"] is None:
                assert row["failed"], f"{cid} {arm}: no number and no reason"
            else:
                assert row["ratio"] > 0 and row["ci95"][0] <= row["ratio"] <= row["ci95"][1]
    repack0 = [r for r in rows if r["config"]["code_path"] == "noamx-repack0" and r["bench_args"]]
    assert all(r["bench_args"][:2] == ["--repack", "0"] for r in repack0)
    assert all(run.get("loadavg_start") for run in data["runs"])
    # every measured row is held against its configuration's roofline (empty fields where it was not measured)
    measured = [r for r in rows if r["median_tok_s"] is not None]
    assert all({"roofline_gbps", "roofline_pct", "binds"} <= set(r) for r in measured)
    assert all(r["binds"] in ("kernel", "memory") for r in measured
               if "in_cache_gbps" in data["rooflines"].get(r["config"]["id"], {}))
    assert all("huge_page_share" in r for r in measured if r["arm"] in compare.PAGE_LEVER_ARMS)
