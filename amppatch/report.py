"""ab-test reports: report.json (the record), report.md (for a terminal), report.png (for a glance) and
roofline.png (each arm's GB/s against the limit, when the roofline was measured).

report.json is read and written only through `amppatch.abtest.result.AbTestResult`; the renderers take its
document (`to_json()`). report.md and report.png are pure functions of report.json, so `amppatch report
DIR` re-renders them from the JSON alone (after editing, on another machine, or with a newer amppatch). The
JSON layout is documented in docs/report-schema.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amppatch.abtest.analysis import samples_from_report, settings_from_report, slice_verdicts
from amppatch.abtest.result import REPORT_JSON, AbTestResult
from amppatch.errors import UnmeasuredError, UsageError
from amppatch.inputs import REPORT
from amppatch.limit import ModelRoofline, kernel_lines, setting_table
from amppatch.limit_plot import ROOFLINE_PNG, plot_note, render_roofline_png
from amppatch.paths import save_figure_atomic, write_text_atomic
from amppatch.weightpages import WeightPages

REPORT_MD = "report.md"
REPORT_PNG = "report.png"
SUPPORTED_SCHEMA = REPORT.schema_version


def _f(value: float | None, fmt: str, missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


def _size(n_bytes: float) -> str:
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} kB"


def _arm_label(arm: dict[str, Any]) -> str:
    extra = " ".join(arm.get("bench_args", []) + [f"{k}={v}" for k, v in arm.get("env", {}).items()])
    return f"{arm['name']} ({extra})" if extra else arm["name"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table padded to column width, so it also reads well as plain text in a terminal."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return [line, rule, *body]


def _arm_setting(report: dict[str, Any], arm: str, setting: str) -> dict[str, Any]:
    for a in report["arms"]:
        if a["name"] == arm:
            return a.get("by_setting", {}).get(setting, {})
    return {}


def _comparison(report: dict[str, Any], arm: str, setting: str) -> dict[str, Any] | None:
    for c in report["comparisons"]:
        if c["arm"] == arm and c["setting"] == setting:
            return c
    return None


def _md_header(report: dict[str, Any]) -> list[str]:
    """Title, run summary line and the headline verdict."""
    opts = report["options"]
    env = report.get("environment", {})
    diag = report.get("diagnostics", {})
    lines: list[str] = ["# amppatch ab-test report", ""]
    model = env.get("model", {})
    types = ", ".join(f"{t} {_size(b)}" for t, b in (model.get("types") or {}).items()) or "?"
    lines.append(
        f"Model `{Path(opts['model']).name}` ({types}) · {opts['reps']} repetitions per call · "
        f"{diag.get('rounds', '?')} rounds ({diag.get('stopped_because', '')}"
        + (f"; the first {diag['resumed_rounds']} from an earlier sitting" if diag.get("resumed_rounds") else "")
        + f") · seed {opts['seed']} · "
        f"min effect ±{opts['min_effect']:.0%}"
    )
    lines.append("")
    head = report.get("headline")
    if head and report.get("ratio") is not None:
        lo, hi = report["ci95"]
        c = _comparison(report, head["arm"], head["setting"]) or {}
        lines.append(
            f"**Verdict: {head['arm']} vs {head['baseline']} ({c.get('setting_label', head['setting'])}): "
            f"{report['verdict'].upper()}** — ratio {report['ratio']:.3f}, 95 % CI [{lo:.3f}, {hi:.3f}], "
            f"resolution ±{c.get('resolution', float('nan')):.1%}, Mann–Whitney p = {_f(c.get('p_value'), '.3g')}"
        )
    else:
        lines.append(f"**Verdict: {report.get('verdict', 'unavailable')}**")
    lines.append("")
    return lines


def _result_row(report: dict[str, Any], s: dict[str, Any], a: dict[str, Any], base: str) -> list[str]:
    """One row of the results table: an arm at a setting."""
    st = a.get("by_setting", {}).get(s["id"], {})
    comp = _comparison(report, a["name"], s["id"])
    if st.get("median_tok_s") is None:
        return [s["label"], _arm_label(a), "failed", "", "", "", st.get("failed") or "no samples", "", "", "", ""]
    bwe = st.get("bandwidth") or {}
    share = bwe.get("share_of_ceiling")
    lat = st.get("latency_ms")
    if a["name"] == base:
        ratio, ci, verdict, p = "1 (baseline)", "", "", ""
    elif comp is None or comp.get("ratio") is None:
        ratio, ci, verdict, p = "—", "", (comp or {}).get("unavailable") or "unavailable", ""
    else:
        lo, hi = comp["ci95"]
        ratio = f"{comp['ratio']:.3f}"
        ci = f"[{lo:.3f}, {hi:.3f}]"
        verdict = f"{comp['verdict']} (±{comp['resolution']:.1%})"
        p = _f(comp.get("p_value"), ".3g")
    return [
        s["label"], _arm_label(a),
        f"{st['median_tok_s']:.2f}",
        f"{st['iqr_tok_s']:.2f}",
        ratio, ci, verdict, p,
        (f"{bwe['gb_per_s']:.2f} GB/s" if bwe else "n/a (pp)") if s["test"] == "tg" else "n/a (pp)",
        _f(share, ".0%", "not measured") if s["test"] == "tg" else "",
        (f"{lat['p50']:.2f}/{lat['p99']:.2f}" if lat else "unavailable") if s["test"] == "tg" else "n/a (pp)",
    ]


def _md_results(report: dict[str, Any]) -> list[str]:
    """The results table, then bandwidth, latency and LLC notes."""
    settings = report.get("settings", [])
    base = report["arms"][0]["name"]
    bw = report.get("bandwidth", {})
    lines = ["## Results", ""]
    rows = [_result_row(report, s, a, base) for s in settings for a in report["arms"]]
    lines += _table(["setting", "arm", "median tok/s", "IQR", "ratio", "95% CI", "verdict", "p",
                     "bandwidth", "% ceiling", "p50/p99 ms"], rows)
    lines.append("")
    tied = " — tied embeddings: the output matmul reads token_embd whole" if bw.get("tied_embeddings") else ""
    deeper = len({s.get("depth", 0) for s in settings if s.get("test") == "tg"}) > 1
    experts = (f"{bw.get('experts_read', 0) / 1e6:.1f} MB of the {bw['n_expert_used']} routed experts of "
               f"{bw['n_expert']} ({bw.get('experts_total', 0) / 1e6:.1f} MB of expert tensors), "
               if bw.get("n_expert") else "")
    lines.append(f"Bandwidth: {bw.get('bytes_per_token', 0) / 1e6:.1f} MB read per generated token "
                 f"(weights {bw.get('weights_whole', 0) / 1e6:.1f} MB streamed whole, "
                 f"{experts}"
                 f"{bw.get('gathered_rows', 0) / 1e3:.1f} kB of gathered embedding rows"
                 f"{tied}"
                 f", KV {bw.get('kv', 0) / 1e6:.2f} MB at {bw.get('context_len', 0):.1f} cached positions on "
                 f"average"
                 f"{'; a setting at another depth counts the KV cache of its own depth' if deeper else ''}"
                 f"); ceiling: {bw.get('ceiling_note', 'not measured')}.")
    lat_note = report.get("latency", {}).get("note", "")
    lines.append(f"Per-token latency: {lat_note}.")
    llc = report.get("llc", {})
    llc_rows = [(a["name"], s["label"], a.get("by_setting", {}).get(s["id"], {}).get("llc_misses_per_token"))
                for a in report["arms"] for s in settings]
    if llc.get("available") and any(v is not None for *_, v in llc_rows):
        lines.append("LLC misses per token: " + ", ".join(f"{n} {lbl} {v:,.0f}" for n, lbl, v in llc_rows
                                                           if v is not None) + ".")
    else:
        lines.append(f"LLC misses: {llc.get('note', 'unavailable on this machine')}.")
    lines.append("")
    return lines


def _md_pairs(report: dict[str, Any]) -> list[str]:
    """The comparisons against another arm than the first (`options.pairs`), when asked for."""
    rows = []
    for c in report.get("pair_comparisons") or []:
        if c.get("ratio") is None:
            rows.append([c.get("setting_label") or c["setting"], f"{c['arm']} vs {c['baseline']}", "—", "",
                         c.get("unavailable") or "unavailable", ""])
            continue
        lo, hi = c["ci95"]
        rows.append([c.get("setting_label") or c["setting"], f"{c['arm']} vs {c['baseline']}", f"{c['ratio']:.3f}",
                     f"[{lo:.3f}, {hi:.3f}]", f"{c['verdict']} (±{c['resolution']:.1%})",
                     _f(c.get("p_value"), ".3g")])
    if not rows:
        return []
    return ["## Other comparisons", "", *_table(["setting", "pair", "ratio", "95% CI", "verdict", "p"], rows), ""]


def _md_limit(report: dict[str, Any]) -> list[str]:
    """How close each arm came to the roofline, and where each arm's weights sat (nothing for a report written
    before ab-test measured either)."""
    doc = report.get("roofline")
    pages = [(a["name"], a["huge_pages"]) for a in report["arms"] if isinstance(a.get("huge_pages"), dict)]
    if not isinstance(doc, dict) and not pages:
        return []
    lines = ["## Limit", ""]
    part = ModelRoofline.from_json(doc) if isinstance(doc, dict) else None
    if part is None:
        lines.append("Roofline: not in this report.")
    elif not part.available:
        lines.append(f"Roofline: {part.note}.")
    else:
        base = report["arms"][0]["name"]
        lines.append(f"The roofline is the lower of the weight kernels' in-cache rate (one n = 1 MUL_MAT on "
                     f"cache-resident weights, {base}'s build, measured in this run) and the better of the "
                     "machine's stream-read ceilings; an arm's GB/s is the bytes a token reads × its median tok/s.")
        lines.append("")
        lines += setting_table(part)
        lines.append("")
        lines.append(f"Kernels measured ({part.measured_share:.0%} of the weight bytes per token):")
        lines += kernel_lines(part)
        lines += [f"- note: {n}" for n in part.notes]
        note = plot_note(part)
        lines.append(f"Plot: {ROOFLINE_PNG}" + (f" {note}" if note else "") + ".")
    if pages:
        lines += ["", "Weights on huge pages (the model file's mapping, from smaps):"]
        lines += [f"- {name}: {WeightPages.from_json(doc).describe()}" for name, doc in pages]
    lines.append("")
    return lines


def _md_correctness(report: dict[str, Any]) -> list[str]:
    lines = ["## Correctness", ""]
    crow = []
    for c in report.get("correctness", []):
        result = "not checked" if c.get("passed") is None else ("passed" if c["passed"] else "FAILED")
        crow.append([f"{c['arm']} vs {c['baseline']}", c.get("mode") or "—", result, c.get("detail", "")])
    lines += _table(["pair", "check", "result", "detail"], crow) if crow else ["(no pairs)"]
    lines.append("")
    return lines


def _md_noise(report: dict[str, Any]) -> list[str]:
    """Per-arm noise and drift, host load, failures and warnings."""
    env = report.get("environment", {})
    diag = report.get("diagnostics", {})
    lines = ["## Noise diagnostics", ""]
    for a in report["arms"]:
        for s in report.get("settings", []):
            st = a.get("by_setting", {}).get(s["id"], {})
            if st.get("median_tok_s") is None:
                continue
            d = st.get("drift") or {}
            lines.append(
                f"- {a['name']} {s['label']}: CV {_f(st.get('cv'), '.1%')}, n = {st.get('n')}, drift "
                f"{_f(d.get('slope_per_round'), '+.2%')}/round (Spearman rho {_f(d.get('spearman_rho'), '+.2f')}, "
                f"p {_f(d.get('p_value'), '.2g')})"
            )
    la, lb = diag.get("loadavg_start"), diag.get("loadavg_end")
    if la:
        end = f", end {lb['1min']:.2f}" if lb else ""
        lines.append(f"- load average (1 min): start {la['1min']:.2f}{end} on {env.get('cpus', '?')} CPUs")
    cf = diag.get("cpufreq", {})
    lines.append(f"- governor: {cf.get('governor', '?')}; boost/turbo: {cf.get('boost', '?')}")
    usage = diag.get("cpu_usage")
    if usage:
        lines.append(f"- CPU capacity while timing: ab-test {usage['ours']:.0%}, other processes "
                     f"{usage['others']:.0%}, hypervisor steal {usage['steal']:.0%}")
    busy = diag.get("busy_processes") or []
    lines.append("- busy processes during timing: " + (
        ", ".join(f"{p['comm']} ({p['cpu_share']:.0%} CPU)" for p in busy) if busy else "none above 5 % CPU"))
    for f in diag.get("failures", []):
        lines.append(f"- failure: {f['arm']} {f['setting']}: {f['reason']}")
    warnings = diag.get("warnings") or []
    if warnings:
        lines.append("")
        lines.append("Warnings:")
        lines += [f"- ⚠ {w}" for w in warnings]
    lines.append("")
    return lines


def _md_environment(report: dict[str, Any]) -> list[str]:
    env = report.get("environment", {})
    lines = ["## Environment", ""]
    lines.append(f"- CPU: {env.get('cpu_model', '?')} ({env.get('cpus', '?')} CPUs); kernel {env.get('kernel', '?')}")
    lines.append(f"- compiler: {', '.join(env.get('compilers', [])) or '?'}")
    for a in report["arms"]:
        extra = " ".join(a.get("bench_args", []) + [f"{k}={v}" for k, v in a.get("env", {}).items()])
        lines.append(f"- arm {a['name']}: `{a['build_dir']}` commit {str(a.get('commit'))[:12]}"
                     f"{' (dirty ' + str(a['dirty_hash'])[:8] + ')' if a.get('dirty_hash') else ''}"
                     f"{' · ' + extra if extra else ''}")
    lines.append("")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [*_md_header(report), *_md_results(report), *_md_pairs(report), *_md_limit(report),
             *_md_correctness(report), *_md_noise(report), *_md_environment(report)]
    lines.append(f"Raw samples: {len(report.get('samples', []))} in {REPORT_JSON}. Schema: docs/report-schema.md.")
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any], path: Path) -> None:
    """Per-arm distributions (one panel per setting) and every comparison's ratio with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report.get("settings", [])
    n = len(settings)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.2 * n + 5, 4.2), squeeze=False)
    for ax, s in zip(axes[0][:n], settings, strict=True):
        names, data = [], []
        for a in report["arms"]:
            st = a.get("by_setting", {}).get(s["id"], {})
            ns = st.get("samples_ns") or []
            if ns:
                names.append(a["name"])
                data.append([st["n_tokens"] * 1e9 / v for v in ns])
        if data:
            ax.boxplot(data, showfliers=False)
            ax.set_xticks(range(1, len(names) + 1), names)
            for i, values in enumerate(data, start=1):
                jitter = [i + 0.12 * ((k * 7919) % 11 - 5) / 5 for k in range(len(values))]
                ax.scatter(jitter, values, s=8, alpha=0.5)
        ax.set_title(s["label"], fontsize=10)
        ax.set_ylabel("tokens / s")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[0][n]
    comps = [c for c in report.get("comparisons", []) if c.get("ratio") is not None]
    min_effect = report["options"]["min_effect"]
    ax.axvspan(1 - min_effect, 1 + min_effect, color="0.9", label=f"±{min_effect:.0%} (equivalent)")
    ax.axvline(1.0, color="0.5", lw=1)
    colors = {"faster": "tab:green", "slower": "tab:red", "equivalent": "tab:blue", "inconclusive": "tab:orange"}
    for i, c in enumerate(comps):
        lo, hi = c["ci95"]
        ax.errorbar([c["ratio"]], [i], xerr=[[c["ratio"] - lo], [hi - c["ratio"]]], fmt="o", capsize=4,
                    color=colors.get(c["verdict"], "k"))
    ax.set_yticks(range(len(comps)), [f"{c['arm']}/{c['baseline']}\n{c['setting']}" for c in comps], fontsize=8)
    if comps:
        lows = [c["ci95"][0] for c in comps] + [1 - 2 * min_effect]
        highs = [c["ci95"][1] for c in comps] + [1 + 2 * min_effect]
        lo_x, hi_x = min(lows), max(highs)
        pad = 0.08 * (hi_x - lo_x)
        ax.set_xlim(max(lo_x - pad, 1e-3), hi_x + pad)  # the ±min-effect band stays visible, edges included
        if max(highs) / max(min(lows), 1e-9) > 1.6:
            # Ratios are multiplicative: a log axis keeps 0.5x and 2x equally far from 1 when CIs are wide.
            from matplotlib.ticker import ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("ratio of median tok/s with 95 % CI")
    ax.set_title("verdicts: " + ", ".join(sorted({c["verdict"] for c in comps})), fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    if comps:
        ax.set_ylim(-0.7, len(comps) - 0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_report(out: Path, result: AbTestResult) -> None:
    """Write report.json (the result's document), then render report.md and report.png from it."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / REPORT_JSON, result.dumps())
    render_all(out)


def load_report(directory: Path) -> AbTestResult:
    """The ab-test result in `directory` (or its report.json), read through `AbTestResult.from_json`."""
    directory = Path(directory).expanduser()
    path = directory if directory.name == REPORT_JSON else directory / REPORT_JSON
    if directory.is_file() and directory.name != REPORT_JSON:
        raise UsageError(f"{directory} is a file, not an ab-test directory",
                         next_step="pass the directory ab-test printed (or its report.json)")
    if not path.is_file():
        raise UsageError(f"{path} does not exist", next_step="pass the directory ab-test printed")
    return AbTestResult.read(path)


def unmeasured(report: dict[str, Any] | AbTestResult) -> list[dict[str, Any]]:
    """The (arm, setting, reason) records of every arm that could not be measured at some setting."""
    if isinstance(report, AbTestResult):
        return report.failures
    failures = (report.get("diagnostics") or {}).get("failures") or []
    return [f for f in failures if isinstance(f, dict)]


def require_measured(report: dict[str, Any] | AbTestResult, directory: Path, what: str = "ab-test") -> None:
    """Raise UnmeasuredError (after the report is written) when an arm could not be measured: a verdict
    with an arm missing is not the answer that was asked for, so the exit status must say so."""
    failed = unmeasured(report)
    if not failed:
        return
    listed = "; ".join(f"arm {f.get('arm')} at {f.get('setting')}: {f.get('reason')}" for f in failed)
    raise UnmeasuredError(f"{what} could not measure {listed} (report in {directory})",
                          next_step="fix that arm's flags or build (run its llama-bench by hand to see why), "
                                    "or drop the arm or the setting")


def render_all(directory: Path) -> Path:
    """Re-render report.md, report.png and (with a measured roofline) roofline.png from report.json; returns
    report.md's path."""
    directory = Path(directory).expanduser()
    if directory.name == REPORT_JSON:
        directory = directory.parent
    result = load_report(directory)
    report = result.to_json()
    md = directory / REPORT_MD
    write_text_atomic(md, render_markdown(report))
    render_png(report, directory / REPORT_PNG)
    if result.roofline is not None and plot_note(result.roofline) is None:
        render_roofline_png(result.roofline, directory / ROOFLINE_PNG)
    return md


def render_slices(report: dict[str, Any], n_slices: int, *, n_boot: int = 4000) -> tuple[str, list[dict[str, Any]]]:
    """Verdicts of `n_slices` disjoint consecutive slices of the run's rounds (A/A false-positive check)."""
    samples = samples_from_report(report)
    settings = settings_from_report(report)
    arms = [a["name"] for a in report["arms"]]
    opts = report["options"]
    results = slice_verdicts(samples, arms, settings, n_slices, min_effect=opts["min_effect"], seed=opts["seed"],
                             n_boot=n_boot)
    rows = []
    for r in results:
        if r["ratio"] is None:
            rows.append([str(r["slice"] + 1), f"{r['rounds'][0] + 1}–{r['rounds'][1] + 1}", r["arm"], r["setting"],
                         "—", "—", r["verdict"]])
            continue
        lo, hi = r["ci95"]
        rows.append([str(r["slice"] + 1), f"{r['rounds'][0] + 1}–{r['rounds'][1] + 1}", r["arm"], r["setting"],
                     f"{r['ratio']:.3f}", f"[{lo:.3f}, {hi:.3f}]", r["verdict"]])
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    text = "\n".join(_table(["slice", "rounds", "arm", "setting", "ratio", "95% CI", "verdict"], rows))
    text += "\n\n" + ", ".join(f"{v}: {n}" for v, n in sorted(counts.items())) + "\n"
    return text, results
