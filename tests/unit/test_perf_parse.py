"""The perf backend's parsing, on recorded `perf` output (this machine has no hardware counters, so the
backend itself can only be refused here; what it would read is checked on text perf prints)."""

from amppatch.profile import parse_perf_report, perf_counters_missing

REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Total Lost Samples: 0
#
# Samples: 12K of event 'cache-misses'
# Event count (approx.): 987654321
#
# Overhead  Symbol
# ........  ...................................
#
    76.51%  [.] ggml_vec_dot_q8_0_q8_0
    12.02%  [.] ggml_compute_forward_mul_mat
     3.10%  [k] clear_page_erms
     0.75%  [.] ggml_graph_compute_thread.isra.0


#
# (Cannot load tips.txt file, please install perf!)
#
"""


def test_perf_report_rows_are_user_symbols_with_their_share() -> None:
    rows = parse_perf_report(REPORT)
    assert [r["function"] for r in rows] == ["ggml_vec_dot_q8_0_q8_0", "ggml_compute_forward_mul_mat",
                                             "ggml_graph_compute_thread.isra.0"]
    assert rows[0]["cache_miss_share"] == 0.7651
    assert parse_perf_report("# Samples: 0 of event 'cache-misses'\n") == []


def test_counters_present_or_missing_from_perf_stat_output() -> None:
    assert perf_counters_missing("123456,,cache-misses,1002345,100.00,,\n", 0) == ""
    missing = perf_counters_missing("<not supported>,,cache-misses,0,100.00,,\n", 0)
    assert "no hardware performance counters" in missing and "<not supported>" in missing
    assert "<not counted>" in perf_counters_missing("<not counted>,,cache-misses,0,0.00,,\n", 0)
    assert "exit 1" in perf_counters_missing("", 1)
