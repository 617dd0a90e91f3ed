"""report.md of `amppatch run`: what ran, what tune kept, the final verdict per setting.

A pure function of the run's options, its stages' outputs and their records, so it is rewritten on every
run (cheap) and tested without running anything."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.learned import Learned
from amppatch.runstate import STAGES, StageRecord

if TYPE_CHECKING:
    from amppatch.run import RunOptions


def model_line(o: RunOptions, model: Mapping[str, Any]) -> str:
    user = model.get("user_model")
    if o.model is None or not user:
        return f"- model: synthetic {o.shape} {o.type} ({model.get('model')})"
    types = ", ".join(f"{t} {s:.0%}" for t, s in (user.get("types") or {}).items())
    experts = f"; {user['n_expert']} experts, {user.get('n_expert_used')} active" if user.get("n_expert") else ""
    arch = user.get("architecture") or "unknown"
    line = f"- model: {user.get('name')} ({arch}; {types}{experts}; {model.get('model')})"
    return line + (f"\n- note: {model['gate_note']}" if model.get("gate_note") else "")


def render_summary(o: RunOptions, outputs: dict[str, dict[str, Any]], stages: Mapping[str, StageRecord]) -> str:
    """report.md of the run: what ran, what tune kept, the final verdict per thread count."""
    lines = ["# amppatch run", ""]
    prof, tune_out, final = outputs.get("profile", {}), outputs.get("tune", {}), outputs.get("final", {})
    lines += [model_line(o, outputs.get("model", {})),
              f"- llama.cpp: {outputs.get('fetch', {}).get('repo')}; "
              f"stock build {outputs.get('build', {}).get('build')}",
              f"- threads: {', '.join(map(str, o.threads or ()))} (tuned at the first); tune budget "
              f"{o.budget_minutes:g} min{' (--quick)' if o.quick else ''}"]
    if prof:
        share = prof.get("hot_share")
        lines.append(f"- hottest function: {prof.get('hot_function')}"
                     + (f" ({share:.0%} of samples)" if isinstance(share, float) else "")
                     + f"; sites: {', '.join(prof.get('sites') or prof.get('fallback_sites') or []) or 'none'}")
    lines += ["", "## Tune", ""]
    if tune_out:
        lines.append(f"learned.json: {tune_out.get('learned')}")
        kept = ", ".join(tune_out.get("winners") or []) or "none"
        lines.append(f"- kept: {kept}; dropped: {tune_out.get('dropped')}")
        learned = Learned.read(Path(tune_out["learned"]))
        for d in learned.dropped:
            lines.append(f"- dropped {d.get('key')}: {d.get('reason')}")
        b = learned.budget
        lines.append(f"- budget: {b.get('spent_minutes')} of {b.get('minutes')} min ({b.get('stopped_because')}), "
                     f"{len(learned.probes)} probe results")
    lines += ["", "## Stock vs tuned", ""]
    if final.get("report"):
        lines += ["| setting | ratio tuned/stock | 95% CI | verdict |", "|---|---|---|---|"]
        for c in final.get("comparisons", []):
            ci = c.get("ci95")
            ratio = f"{c['ratio']:.3f}" if c.get("ratio") is not None else "—"
            cis = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"
            lines.append(f"| {c.get('setting_label') or c.get('setting')} | {ratio} | {cis} | {c.get('verdict')} |")
        lines += ["", f"Full report: {final['report']}/report.md"]
    else:
        reason = (outputs.get("final") or outputs.get("bake") or {}).get("reason", "not run")
        lines.append(f"No final ab-test: {reason}. The stock build stays the answer.")
    lines += limit_lines(final.get("report"))
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name in STAGES[:-1]:
        rec = stages.get(name)
        status = rec.status if rec is not None and rec.status is not None else "—"
        seconds = rec.seconds if rec is not None and rec.seconds is not None else "—"
        lines.append(f"| {name} | {status} | {seconds} |")
    return "\n".join(lines) + "\n"


def limit_lines(final_report: str | None) -> list[str]:
    """The "## Limit" section from the final ab-test's roofline: per setting the roofline, which side binds
    and each arm's share of it, then where each arm's weights sat (nothing without a final report)."""
    from amppatch.abtest.result import AbTestResult
    from amppatch.limit import summary_lines

    if not final_report:
        return []
    result = AbTestResult.read(Path(final_report))
    lines = ["", "## Limit", ""]
    if result.roofline is None:
        lines.append("- roofline: not in the final report")
    else:
        lines += [f"- {line}" for line in summary_lines(result.roofline)]
    for arm in result.arms:
        if arm.huge_pages is not None:
            lines.append(f"- weights of {arm.name}: {arm.huge_pages.describe()}")
    return lines
