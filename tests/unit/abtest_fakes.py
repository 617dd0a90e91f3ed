"""A build directory ab-test's loader accepts, for tests whose llama-bench is faked (`execute._run_bench`);
shared by test_exit_codes.py, test_report.py and test_abtest_warmup.py."""

from __future__ import annotations

import json
from pathlib import Path


def fake_build(root: Path) -> Path:
    """A build directory load_build accepts (its llama-bench is never started: _run_bench is faked)."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "llama-bench").write_text("")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "source_dir": str(root),
                                                    "commit": "c0ffee"}))
    return root
