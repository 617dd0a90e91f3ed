"""ab-test's pure parts: arm syntax, option checks, the interleaved schedule, gate planning, analysis."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf_files import write_small_gguf

from amppatch import abtest
from amppatch.abtest import AbTestOptions, ArmSpec, Sample, Setting
from amppatch.errors import UsageError

# --- arm syntax ---------------------------------------------------------------------------------------


def test_parse_arm_name_build_flags_and_env() -> None:
    arm = abtest.parse_arm("norepack=/b/x::--repack 0::GGML_FOO=1::-ub 1")
    assert arm.name == "norepack"
    assert arm.build == Path("/b/x")
    assert arm.bench_args == ("--repack", "0", "-ub", "1")
    assert arm.env == (("GGML_FOO", "1"),)
    assert arm.label == "norepack (--repack 0 -ub 1 GGML_FOO=1)"


def test_parse_arm_for_a_and_b_takes_no_name() -> None:
    arm = abtest.parse_arm("/builds/abc/manifest.json", name="A")
    assert arm == ArmSpec("A", Path("/builds/abc/manifest.json"))
    assert abtest.parse_arm("/b::VAR=a=b", name="B").env == (("VAR", "a=b"),)


@pytest.mark.parametrize(
    "text",
    [
        "/no/name/here",  # --arm needs NAME=
        "bad name=/b",
        "x=",
        "x=/b::notaflag",
        "x=/b::-m other.gguf",  # the model is ab-test's
        "x=/b::-r 10",
        "x=/b::--n-gen=5",
        "x=/b::-o json",
    ],
)
def test_parse_arm_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        abtest.parse_arm(text)


def _options(tmp_path: Path, **kw: object) -> AbTestOptions:
    model = write_small_gguf(tmp_path / "m.gguf")  # validate() checks the model's structure
    base = {"arms": (ArmSpec("A", tmp_path), ArmSpec("B", tmp_path)), "model": model}
    base.update(kw)
    return AbTestOptions(**base)  # type: ignore[arg-type]


def test_validate_accepts_defaults(tmp_path: Path) -> None:
    abtest.validate(_options(tmp_path))


@pytest.mark.parametrize(
    "change",
    [
        {"arms": ()},
        {"arms": (ArmSpec("A", Path("/x")), ArmSpec("A", Path("/y")))},
        {"model": Path("/does/not/exist.gguf")},
        {"tests": ("tg", "xx")},
        {"threads": (0,)},
        {"tokens": 0},
        {"rounds": 1},
        {"rounds": 4, "max_time": 60.0},
        {"max_time": -1.0},
        {"min_effect": 0.0},
        {"gate_mode": "maybe"},
        {"cpu_mask": "zz"},
        {"depth": -1},
    ],
)
def test_validate_rejects(tmp_path: Path, change: dict) -> None:
    with pytest.raises(UsageError):
        abtest.validate(_options(tmp_path, **change))


def test_options_json_is_plain(tmp_path: Path) -> None:
    data = _options(tmp_path, arms=(abtest.parse_arm("A=/a::--repack 0::X=1"), ArmSpec("B", Path("/b")))).to_json()
    assert data["arms"][0] == {"name": "A", "build": "/a", "bench_args": ["--repack", "0"], "env": {"X": "1"}}
    assert isinstance(data["model"], str) and data["threads"] == [1]


# --- schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_arms", [2, 3, 4])
def test_block_order_is_a_mirror_so_every_arm_has_the_same_mean_position(n_arms: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = abtest.block_order(n_arms, rng)
        assert len(order) == 2 * n_arms
        assert Counter(order) == Counter({a: 2 for a in range(n_arms)})
        assert order == order[::-1]
        positions = {a: sum(i for i, x in enumerate(order) if x == a) for a in range(n_arms)}
        assert len(set(positions.values())) == 1


def test_two_arm_blocks_are_abba_or_baab_and_both_occur() -> None:
    slots = abtest.make_schedule(30, ["tg64-t1"], 2, seed=1)
    blocks: dict[int, list[int]] = {}
    for s in slots:
        blocks.setdefault(s.block, []).append(s.arm)
    kinds = {tuple(v) for v in blocks.values()}
    assert kinds == {(0, 1, 1, 0), (1, 0, 0, 1)}


def test_schedule_covers_every_setting_each_round_with_unique_blocks() -> None:
    settings = ["tg64-t1", "tg64-t2", "pp128-t1"]
    slots = abtest.make_schedule(4, settings, 3, seed=5)
    assert len(slots) == 4 * len(settings) * 6
    for r in range(4):
        in_round = [s for s in slots if s.round == r]
        assert sorted({s.setting for s in in_round}) == sorted(settings)
    block_settings = {(s.block, s.setting) for s in slots}
    assert len({b for b, _ in block_settings}) == len(block_settings) == 12


def test_schedule_is_seeded_and_a_shorter_run_is_a_prefix() -> None:
    a = abtest.make_schedule(6, ["x", "y"], 2, seed=3)
    assert a == abtest.make_schedule(6, ["x", "y"], 2, seed=3)
    assert a != abtest.make_schedule(6, ["x", "y"], 2, seed=4)
    assert abtest.make_schedule(3, ["x", "y"], 2, seed=3) == a[: len(a) // 2]


def test_settings_for_orders_tests_then_threads() -> None:
    opts = AbTestOptions(arms=(), model=Path("m"), threads=(1, 2), tests=("tg", "pp"), tokens=32,
                         prompt_tokens=64, depth=128)
    ids = [s.id for s in abtest.settings_for(opts)]
    assert ids == ["tg32-d128-t1", "tg32-d128-t2", "pp64-d128-t1", "pp64-d128-t2"]
    assert Setting("tg", 2, 64).label == "tg64, 2 threads"


# --- gate planning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bench", "gate"),
    [
        ((), []),
        (("--repack", "0"), ["-nr"]),
        (("--repack=1",), ["--repack"]),
        (("-fa", "1", "-ub", "1"), ["-fa", "on", "-ub", "1"]),
        (("-t", "2", "--prio", "2", "-C", "0x1"), ["-t", "2"]),
        (("--no-warmup", "-ctk", "q8_0"), ["-ctk", "q8_0"]),
    ],
)
def test_gate_args_translate_llama_bench_flags(bench: tuple[str, ...], gate: list[str]) -> None:
    assert abtest.gate_args_for(bench) == (gate, None)


def test_gate_args_name_what_cannot_be_translated() -> None:
    args, bad = abtest.gate_args_for(("-nkvo", "1"))
    assert args == [] and bad == "-nkvo 1"
    assert abtest.gate_args_for(("--repack", "0,1"))[1] == "--repack 0,1"


def test_kernel_signature_decides_the_gate_mode() -> None:
    manifest = {"cmake_options": {"GGML_NATIVE": "ON"}, "isa_disabled": []}
    plain = ArmSpec("A", Path("/a"))
    assert abtest.kernel_signature(plain, manifest) == abtest.kernel_signature(ArmSpec("B", Path("/b")), manifest)
    # scheduling flags do not change kernels; --repack 0 and another CMake option do
    sched = ArmSpec("B", Path("/b"), ("--prio", "2"))
    assert abtest.kernel_signature(plain, manifest) == abtest.kernel_signature(sched, manifest)
    norepack = ArmSpec("B", Path("/b"), ("--repack", "0"))
    assert abtest.kernel_signature(plain, manifest) != abtest.kernel_signature(norepack, manifest)
    other = {"cmake_options": {"GGML_NATIVE": "OFF"}, "isa_disabled": []}
    assert abtest.kernel_signature(plain, manifest) != abtest.kernel_signature(plain, other)


# --- analysis -----------------------------------------------------------------------------------------


def _samples(ratio: float, n_rounds: int = 8, noise: float = 0.02, seed: int = 0,
             setting: str = "tg64-t1") -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for slot in abtest.make_schedule(n_rounds, [setting], 2, seed=seed):
        arm = "A" if slot.arm == 0 else "B"
        speed = 100.0 * (ratio if arm == "B" else 1.0) * rng.lognormal(0, noise)
        for rep in range(3):
            ns = int(64 * 1e9 / (speed * rng.lognormal(0, noise)))
            out.append(Sample(slot.round, slot.block, slot.slot, arm, setting, rep, ns, 64))
    return out


def test_analyze_finds_the_true_direction() -> None:
    setting = Setting("tg", 1, 64)
    fast = abtest.analyze(_samples(1.25), ["A", "B"], [setting], {}, min_effect=0.05, seed=0, n_boot=500)
    assert [c["verdict"] for c in fast] == ["faster"]
    assert fast[0]["ratio"] == pytest.approx(1.25, rel=0.05)
    assert fast[0]["n_a"] == fast[0]["n_b"] == 8 * 2 * 3
    same = abtest.analyze(_samples(1.0, noise=0.005), ["A", "B"], [setting], {}, min_effect=0.05, seed=0,
                          n_boot=500)
    assert same[0]["verdict"] == "equivalent"
    assert same[0]["paired"] and same[0]["n_blocks"] == 8


def test_analyze_reports_a_failed_arm_as_unavailable() -> None:
    setting = Setting("pp", 1, 128)
    comps = abtest.analyze([], ["A", "B"], [setting], {("B", setting.id): "cannot run prompts: SIGILL"},
                           min_effect=0.05, seed=0, n_boot=100)
    assert comps[0]["verdict"] == "unavailable"
    assert comps[0]["ratio"] is None and comps[0]["ci95"] is None
    assert "B: cannot run prompts" in comps[0]["unavailable"]


def test_slice_verdicts_split_rounds_disjointly() -> None:
    samples = _samples(1.0, n_rounds=10, noise=0.005)
    out = abtest.slice_verdicts(samples, ["A", "B"], [Setting("tg", 1, 64)], 5, min_effect=0.05, seed=0,
                                n_boot=300)
    assert [c["slice"] for c in out] == [0, 1, 2, 3, 4]
    assert [c["rounds"] for c in out] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert all(c["n_a"] == 2 * 2 * 3 for c in out)
    with pytest.raises(UsageError):
        abtest.slice_verdicts(samples, ["A", "B"], [Setting("tg", 1, 64)], 6, min_effect=0.05, seed=0,
                              n_boot=10)


def test_per_round_medians() -> None:
    samples = [Sample(r, r, 0, "A", "s", rep, int(1e9 / (10 + r)), 1) for r in range(3) for rep in range(3)]
    assert abtest.per_round_medians(samples, "A", "s") == pytest.approx([10.0, 11.0, 12.0])


# --- environment readers ------------------------------------------------------------------------------


def test_busy_processes_from_snapshots() -> None:
    hz = os.sysconf("SC_CLK_TCK")
    before = {1: ("cc1plus", 0), 2: ("idle", 5), 3: ("me", 0)}
    after = {1: ("cc1plus", 5 * hz), 2: ("idle", 5), 3: ("me", 10 * hz), 4: ("new", 2 * hz)}
    busy = abtest.busy_processes(before, after, 10.0, exclude={3})
    assert busy == [{"pid": 1, "comm": "cc1plus", "cpu_share": 0.5}, {"pid": 4, "comm": "new", "cpu_share": 0.2}]


def _burn_cpu(seconds: float) -> None:
    """Spend this much CPU time, so a tick counter that works must have moved (clock ticks are 10 ms)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_proc_readers_work_on_this_machine() -> None:
    load = abtest.read_loadavg()
    assert load is not None and load["threads"] >= 1
    freq = abtest.read_cpufreq()
    assert set(freq) == {"governor", "boost"}
    before = abtest._proc_cpu_ticks()[os.getpid()][1]
    _burn_cpu(0.15)
    assert abtest._proc_cpu_ticks()[os.getpid()][1] > before


def test_parse_perf_llc() -> None:
    text = "1234567,,LLC-load-misses,1000,100.00,,\n"
    assert abtest.parse_perf_llc(text) == 1234567
    assert abtest.parse_perf_llc("<not supported>,,LLC-load-misses,0,100.00,,") is None


def test_ceiling_for_picks_the_thread_count() -> None:
    ceiling = {1: 40.0, 2: 50.0, 8: 90.0}
    assert abtest.ceiling_for(ceiling, 2) == (50.0, 2)
    assert abtest.ceiling_for(ceiling, 4) == (50.0, 2)
    assert abtest.ceiling_for({2: 50.0}, 1) == (50.0, 2)
    assert abtest.ceiling_for(None, 1) == (None, None)


def test_cpu_usage_splits_capacity_between_us_others_and_steal() -> None:
    before = {"user": 0, "nice": 0, "system": 0, "idle": 0, "iowait": 0, "irq": 0, "softirq": 0, "steal": 0}
    after = {"user": 150, "nice": 0, "system": 10, "idle": 30, "iowait": 0, "irq": 0, "softirq": 0, "steal": 10}
    usage = abtest.cpu_usage(before, after, own_ticks=100)
    assert usage == pytest.approx({"busy": 0.8, "ours": 0.5, "others": 0.3, "steal": 0.05})
    assert abtest.cpu_usage(None, after, 0) is None
    real = abtest.cpu_usage(abtest.read_cpu_times(), abtest.read_cpu_times(), 0)
    assert real is None or 0.0 <= real["busy"] <= 1.0
    before = abtest.own_cpu_ticks()
    _burn_cpu(0.15)
    assert abtest.own_cpu_ticks() > before


def test_arm_threads_honours_an_arm_override() -> None:
    setting = Setting("tg", 1, 64)
    assert abtest.arm_threads(ArmSpec("A", Path("/a")), setting) == 1
    assert abtest.arm_threads(ArmSpec("B", Path("/b"), ("-t", "2")), setting) == 2
    assert abtest.arm_threads(ArmSpec("B", Path("/b"), ("--threads=4",)), setting) == 4
