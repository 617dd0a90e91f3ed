"""Roofline: options, default sizes, which side binds, and the probe's recorded output → typed result."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from amppatch.cli import build_parser
from amppatch.errors import SubprocessError, UsageError
from amppatch.roofline import (
    Rate,
    RooflineOptions,
    RooflineResult,
    binds,
    contention_warnings,
    default_sizes,
    format_table,
    load_results,
    parse_probe_output,
    result_from_output,
    results_from_json,
    results_to_json,
    validate,
)

MIB = 1 << 20
# Recorded: `roofline q4_0 2048 2 <2 MiB> <64 MiB> 3 0.1 auto` on a loaded 2-core machine (CPU share ≈ 0.12),
# smaps cut to the weight buffers' mappings.
PROBE_OUT = (Path(__file__).parent / "data" / "roofline_probe.out").read_text()


def _result(ceiling: float | None = 0.3) -> RooflineResult:
    return result_from_output(PROBE_OUT, ceiling=ceiling, build_dir="/b", build_key="k", loadavg=(1.0, 2.0))


@pytest.mark.parametrize("changes, message", [
    ({"type": "iq2_xxs"}, "cannot fill weights of type"),
    ({"type": "q4_k", "width": 2048 + 32}, "multiple of q4_k's block size 256"),
    ({"width": 0}, "not a positive multiple"),
    ({"threads": 0}, "threads must be at least 1"),
    ({"repeats": 2}, "repeats must be at least 3"),
    ({"seconds": 0.0}, "seconds per measurement must be positive"),
    ({"cache_bytes": 1000}, "cache bytes 1000 is too small"),
])
def test_validate_refuses_bad_options(changes: dict, message: str):
    with pytest.raises(UsageError, match=message):
        validate(RooflineOptions(build=Path("/b"), **changes))


def test_validate_accepts_the_documented_cases():
    for kind in ("q8_0", "F16", "q4_0", "q4_k"):
        validate(RooflineOptions(build=Path("/b"), type=kind, width=2048, threads=2))


def test_default_sizes_half_l2_per_thread_and_four_llcs():
    assert default_sizes(1, 2 * MIB, 300 * MIB, 24 << 30) == (1 * MIB, 1200 * MIB)
    assert default_sizes(2, 2 * MIB, 300 * MIB, 24 << 30) == (2 * MIB, 1200 * MIB)
    # a small LLC: the cache set stays within half of it; the streaming set is at least 256 MiB
    assert default_sizes(8, 2 * MIB, 4 * MIB, 24 << 30) == (2 * MIB, 256 * MIB)
    # little free memory caps the streaming set
    assert default_sizes(1, 1 * MIB, 300 * MIB, 2 << 30) == (MIB // 2, 512 * MIB)


def test_binds_compares_in_cache_rate_with_the_ceiling():
    assert binds(30.0, 12.0) == "memory"
    assert binds(8.0, 12.0) == "kernel"
    assert binds(12.0, 12.0) == "kernel"
    assert binds(8.0, None) is None and binds(8.0, 0.0) is None


def test_parse_probe_output_splits_records_and_smaps():
    setup, offered, samples, smaps = parse_probe_output(PROBE_OUT)
    assert setup["buffer"] == "CPU_REPACK" and [s["label"] for s in setup["sets"]] == ["cache", "stream"]
    assert offered == [{"name": "CPU_REPACK", "takes": 1}]
    assert len(samples) == 6 and {s["label"] for s in samples} == {"cache", "stream"}
    assert smaps.count("rw-p") == 3


def test_result_from_recorded_output():
    r = _result()
    assert (r.kernel_type, r.row_width, r.threads, r.buffer_type) == ("q4_0", 2048, 2, "CPU_REPACK")
    assert r.kernel_path.startswith("repack GEMV")
    assert r.in_cache.gbps == (0.0295, 0.0289, 0.0279) and r.in_cache_gbps == pytest.approx(0.0289)
    assert r.streaming.gbps == (0.5851, 0.5173, 0.4982) and r.streaming_gbps == pytest.approx(0.5173)
    assert r.in_cache.bytes == 2082816 and r.streaming.rows == 58240
    assert (r.in_cache.low, r.in_cache.high) == (0.0279, 0.0295)
    # the streaming matrix is on 4 KiB pages (MADV_NOHUGEPAGE), and smaps says so
    assert r.streaming.huge_page_bytes == 0
    assert r.in_cache.median_cpu_share == pytest.approx(0.1242)
    assert r.in_cache.cpu_normalized_median == pytest.approx(0.0295 / 0.1271)  # median of the ratios
    assert r.buffers_offered == (("CPU_REPACK", True),)
    # this loaded run consumed cache-resident weights slower than a 0.3 GB/s ceiling: the kernel binds
    assert r.binds == "kernel" and r.headroom == pytest.approx(0.0289 / 0.3)


def test_huge_pages_of_the_weights_come_from_smaps():
    # the cache matrix's mapping (the last one) on anonymous huge pages
    at = PROBE_OUT.rindex("AnonHugePages:")
    text = PROBE_OUT[:at] + "AnonHugePages:      2048 kB" + PROBE_OUT[PROBE_OUT.index("\n", at):]
    r = result_from_output(text, ceiling=None, build_dir="/b", build_key="k")
    assert r.in_cache.huge_page_bytes > 2 * MIB * 0.99
    # the streaming matrix's last bytes share that mapping: smaps counts per mapping, so they get a prorated part
    assert r.streaming.huge_page_bytes < 4096


def test_result_round_trips_through_json():
    r = _result()
    data = json.loads(json.dumps(results_to_json([r, _result(None)])))
    assert data["results"][0]["binds"] == "kernel" and data["results"][1]["binds"] is None
    back = results_from_json(data)
    assert back == [r, _result(None)]


def test_load_results_reports_bad_files_in_one_line(tmp_path: Path):
    good = tmp_path / "r.json"
    good.write_text(json.dumps(results_to_json([_result()])))
    assert load_results(good)[0].kernel_type == "q4_0"
    for text in ("{", "[]", json.dumps({"schema_version": 9, "results": []})):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(UsageError):
            load_results(bad)
    with pytest.raises(UsageError, match="cannot read roofline file"):
        load_results(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="schema_version 2"):
        RooflineResult.from_json({**_result().to_json(), "schema_version": 2})


def test_output_without_measurements_is_an_error():
    setup_only = "\n".join(line for line in PROBE_OUT.splitlines() if '"sample"' not in line)
    with pytest.raises(SubprocessError, match="no measurements"):
        result_from_output(setup_only, ceiling=None, build_dir="/b", build_key="k")
    no_stream = "\n".join(line for line in PROBE_OUT.splitlines() if '"label":"stream","repeat"' not in line)
    with pytest.raises(SubprocessError, match="no stream measurement"):
        result_from_output(no_stream, ceiling=None, build_dir="/b", build_key="k")


def test_format_table_has_one_row_per_result():
    table = format_table([_result(), _result(None)])
    lines = table.splitlines()
    assert len(lines) == 4 and "| q4_0 | 2048 | 2 | CPU_REPACK" in lines[2]
    assert "kernel (0.10×)" in lines[2] and lines[3].endswith("| — | — |")


def test_rate_of_one_measurement_set():
    rate = Rate(bytes=10, rows=1, gbps=(3.0, 1.0, 2.0), cpu_share=(1.0, 0.5, 1.0))
    assert (rate.median, rate.low, rate.high) == (2.0, 1.0, 3.0)
    assert rate.cpu_normalized_median == 2.0 and Rate.from_json(rate.to_json()) == rate


def test_cli_parses_lists():
    args = build_parser().parse_args(["roofline", "--build", "/b", "--type", "q8_0,f16,q4_0", "--threads", "1,2"])
    assert args.type == ["q8_0", "f16", "q4_0"] and args.threads == [1, 2] and args.width == 2048
    with pytest.raises(SystemExit):
        build_parser().parse_args(["roofline", "--build", "/b", "--threads", "one"])


def test_contention_warnings_name_the_starved_measurements():
    (line,) = contention_warnings([_result()])
    assert line.startswith("q4_0 at 2 thread(s) ran under contention (CPU share in cache 0.12, streaming 0.12)")
    quiet = Rate(bytes=10, rows=1, gbps=(1.0, 1.0, 1.0), cpu_share=(0.99, 1.0, 0.97))
    r = _result()
    assert contention_warnings([replace(r, in_cache=quiet, streaming=quiet)]) == []


@pytest.mark.parametrize("extra, message", [
    (["--ceiling", "nan"], "--ceiling must be a positive number"),
    (["--ceiling", "inf"], "--ceiling must be a positive number"),
    (["--cache-mib", "nan"], "--cache-mib must be a positive number"),  # was a ValueError traceback
    (["--stream-mib", "inf"], "--stream-mib must be a positive number"),  # was an OverflowError traceback
    (["--seconds", "inf"], "seconds per measurement must be positive"),  # would never finish
])
def test_cli_refuses_non_finite_numbers(tmp_path, capsys, extra, message):
    from amppatch.cli import main

    assert main(["roofline", "--build", str(tmp_path), "--ceiling", "10", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_checks_the_output_before_measuring(tmp_path, capsys, monkeypatch):
    from amppatch import roofline
    from amppatch.cli import main

    def measured(*a, **k):
        raise AssertionError("measured before -o was checked")

    monkeypatch.setattr(roofline, "measure_roofline", measured)
    assert main(["roofline", "--build", str(tmp_path), "--ceiling", "10", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
