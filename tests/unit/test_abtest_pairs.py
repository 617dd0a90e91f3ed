"""ab-test beyond every arm against the first: extra settings (a long depth, pp at one thread count) and
comparisons of one arm against another; the report keeps its shape and reads back as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_files import write_small_gguf

from amppatch import abtest, report
from amppatch.abtest import AbTestOptions, ArmSpec, Sample, Setting, runner
from amppatch.abtest import execute as execute_mod
from amppatch.abtest.schedule import Slot
from amppatch.errors import UsageError


def test_extra_settings_follow_the_grid_and_are_not_measured_twice() -> None:
    opts = AbTestOptions(arms=(), model=Path("m"), threads=(1, 2), tokens=16,
                         extra_settings=(Setting("tg", 1, 16, 128), Setting("pp", 1, 64), Setting("tg", 2, 16)))
    assert [s.id for s in abtest.settings_for(opts)] == ["tg16-t1", "tg16-t2", "tg16-d128-t1", "pp64-t1"]
    assert opts.to_json()["extra_settings"][0] == {"test": "tg", "threads": 1, "n_tokens": 16, "depth": 128}


def _options(tmp_path: Path, **kw: object) -> AbTestOptions:
    arms = (ArmSpec("stock", tmp_path), ArmSpec("prefetch", tmp_path), ArmSpec("both", tmp_path))
    return AbTestOptions(arms=arms, model=write_small_gguf(tmp_path / "m.gguf"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"pairs": (("both", "nope"),)},
    {"pairs": (("both", "both"),)},
    {"extra_settings": (Setting("xx", 1, 16),)},
    {"extra_settings": (Setting("tg", 0, 16),)},
    {"extra_settings": (Setting("tg", 1, 16, -1),)},
])
def test_bad_pairs_and_settings_are_refused(tmp_path: Path, change: dict) -> None:
    with pytest.raises(UsageError):
        abtest.validate(_options(tmp_path, **change))
    abtest.validate(_options(tmp_path, pairs=(("both", "prefetch"),), extra_settings=(Setting("pp", 1, 64),)))


def _samples(speeds: dict[str, float], setting: str = "tg16-t1", blocks: int = 6) -> list[Sample]:
    out = []
    for block in range(blocks):
        for slot, (arm, tok_s) in enumerate(speeds.items()):
            jitter = 1 + 0.002 * ((block + slot) % 3)
            out += [Sample(block, block, slot, arm, setting, rep, int(16e9 / (tok_s * jitter)), 16) for rep in (0, 1)]
    return out


def test_a_pair_is_judged_against_its_own_baseline() -> None:
    samples = _samples({"stock": 10.0, "prefetch": 12.0, "both": 12.0})
    setting = Setting("tg", 1, 16)
    comps = abtest.analyze_pairs(samples, [("both", "prefetch")], [setting], {}, min_effect=0.05, seed=0, n_boot=300)
    assert [(c["arm"], c["baseline"]) for c in comps] == [("both", "prefetch")]
    assert comps[0]["ci95"][0] < 1.0 < comps[0]["ci95"][1]  # the same speed: the CI spans 1
    against_stock = abtest.analyze(samples, ["stock", "prefetch", "both"], [setting], {}, min_effect=0.05, seed=0,
                                   n_boot=300)
    assert [c["verdict"] for c in against_stock] == ["faster", "faster"]
    failed = abtest.analyze_pairs(samples, [("both", "prefetch")], [setting], {("prefetch", setting.id): "boom"},
                                  min_effect=0.05, seed=0, n_boot=300)
    assert failed[0]["verdict"] == "unavailable" and failed[0]["unavailable"] == "prefetch: boom"


def test_the_report_carries_the_pairs_and_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    (build / "bin" / "llama-bench").write_text("")
    (build / "manifest.json").write_text(json.dumps({"schema_version": 1, "source_dir": str(build)}))
    monkeypatch.setattr(runner, "stream_ceiling", lambda: (None, "not measured (test)", None))
    monkeypatch.setattr(execute_mod, "_run_bench", lambda argv, env, timeout, label: {"samples_ns": [10_000_000]})
    speed = {0: 1.0, 1: 0.9, 2: 0.9}  # stock, then two arms 10 % faster (shorter samples)

    def replay(slot: Slot, setting: Setting) -> list[int]:
        return [int(10_000_000 * speed[slot.arm]) + 1000 * slot.slot] * 2

    options = AbTestOptions(
        arms=(ArmSpec("stock", build), ArmSpec("prefetch", build), ArmSpec("both", build)),
        model=write_small_gguf(tmp_path / "m.gguf", heads=4),
        tokens=16, rounds=2, reps=2, skip_correctness=True, latency="off", llc=False, n_boot=200,
        out=tmp_path / "out", extra_settings=(Setting("tg", 1, 16, 128), Setting("pp", 1, 64)),
        pairs=(("both", "prefetch"),))
    result = abtest.run_abtest(options, replay)
    assert [s.id for s in result.settings] == ["tg16-t1", "tg16-d128-t1", "pp64-t1"]
    assert [(c.arm, c.baseline) for c in result.comparisons] == [("prefetch", "stock"), ("both", "stock")] * 3
    pairs = result.pair_comparisons
    assert [(c.arm, c.baseline, c.setting) for c in pairs] == [("both", "prefetch", s.id) for s in result.settings]
    assert result.verdict == "faster" and result.headline is not None and result.headline["baseline"] == "stock"
    assert report.load_report(result.path or tmp_path) == result
    # a deeper setting reads more KV cache per token: its bandwidth counts its own depth
    stock = result.arm("stock")
    assert stock is not None
    deep, flat = stock.at("tg16-d128-t1")["bandwidth"]["gb_per_s"], stock.at("tg16-t1")["bandwidth"]["gb_per_s"]
    assert deep / stock.at("tg16-d128-t1")["median_tok_s"] > flat / stock.at("tg16-t1")["median_tok_s"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Other comparisons" in text and "| tg16 at depth 128, 1 thread | both vs prefetch |" in text


def test_a_report_without_pairs_has_no_pair_table() -> None:
    assert report._md_pairs({"pair_comparisons": []}) == [] and report._md_pairs({}) == []
