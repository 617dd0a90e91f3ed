"""ab-test's warmup through the real command code with llama-bench replaced by a fake: a long-context
setting is warmed up at a short depth (its timed calls fill the whole context first anyway)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from abtest_fakes import fake_build

from amppatch.abtest import execute, runner
from amppatch.abtest.execute import WARMUP_DEPTH, warmup_setting
from amppatch.abtest.options import Setting
from amppatch.cli import main


def test_a_warmup_fills_a_long_context_only_a_short_way() -> None:
    long = Setting("tg", 1, 16, 4096)
    assert warmup_setting(long) == Setting("tg", 1, 16, WARMUP_DEPTH)
    assert warmup_setting(Setting("tg", 1, 16, 32)) == Setting("tg", 1, 16, 32)  # already short
    assert warmup_setting(Setting("pp", 2, 256)) == Setting("pp", 2, 256)


def test_ab_test_times_the_full_depth_after_a_short_warmup(
        tmp_path: Path, small_gguf: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    build = fake_build(tmp_path / "build")
    calls: list[list[str]] = []

    def bench(argv: list[str], env: dict[str, str], timeout: float, label: str) -> dict[str, Any]:
        calls.append(argv)
        n = int(argv[argv.index("-r") + 1])
        return {"samples_ns": [10_000_000 + 1000 * (len(calls) % 7)] * n, "n_threads": 1}

    monkeypatch.setattr(execute, "_run_bench", bench)
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    assert main(["ab-test", "--a", str(build), "--b", str(build), "-m", str(small_gguf), "--depth", "4096",
                 "--tokens", "16", "--rounds", "2", "--reps", "2", "--skip-correctness", "--latency", "off",
                 "--no-llc", "--no-roofline", "-o", str(tmp_path / "out")]) == 0
    depths = [c[c.index("-d") + 1] for c in calls]
    assert depths[:2] == [str(WARMUP_DEPTH)] * 2  # one warmup per arm
    assert set(depths[2:]) == {"4096"} and len(depths) == 2 + 2 * 4  # two rounds of A B B A
    assert "warmup A tg16 at depth 64, 1 thread (timed at depth 4096)" in capsys.readouterr().err
