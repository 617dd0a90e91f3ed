"""report.md of `amppatch run`: what ran, what tune kept, the final verdict per setting.

A pure function of the run's options, its stages' outputs and their records, so it is rewritten on every
run (cheap) and tested without running anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def _ci(ratio: Any, ci: Any) -> str:
    if not isinstance(ratio, int | float):
        return "—"
    return f"{ratio:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, Sequence) and len(ci) == 2 else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _site_label(site: Mapping[str, Any]) -> str:
    return f"loop {site.get('loop')} {site.get('stream')}" if site.get("stream") else str(site.get("key"))


def _outcome(site: Mapping[str, Any]) -> str:
    if site.get("kept"):
        return f"{site.get('distance_bytes')} B, hint {site.get('hint')}"
    by = site.get("dropped_by")
    return f"dropped{f' ({by})' if by else ''}: {site.get('reason') or 'no reason recorded'}"


def kernel_table(kernels: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-kernel table: share, sites, the tuned setting or why each site was dropped, its contribution."""
    lines = ["| kernel | share | site(s) | tuned setting (distance, hint), or why dropped | contribution vs off "
             "(95% CI) |", "|---|---|---|---|---|"]
    for k in kernels:
        sites = list(k.get("sites") or [])
        several = len(sites) > 1
        share = k.get("share")
        cells = [
            f"`{k.get('function')}`", f"{share:.1%}" if isinstance(share, int | float) else "—",
            "; ".join(_site_label(s) for s in sites),
            "; ".join((f"{_site_label(s)}: " if several else "") + _outcome(s) for s in sites),
            "; ".join((f"{_site_label(s)}: " if several else "") + _ci(s.get("ratio"), s.get("ci95")) for s in sites),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def joint_line(joint: Mapping[str, Any] | None) -> str:
    """The joint verification's result in one line."""
    if not joint:
        return "Joint verification: not recorded (learned.json of schema 1)."
    status, reason = joint.get("status"), joint.get("reason") or ""
    ci = _ci(joint.get("ratio"), joint.get("ci95"))
    drops = len(joint.get("dropped") or [])
    after = f" after dropping {drops} site(s)" if drops else ""
    if status == "verified":
        return (f"Joint verification: {', '.join(joint.get('sites') or [])} together against every site off at "
                f"{joint.get('threads')} thread(s){after}: {ci}, wholly above {joint.get('threshold', 1.0):.3f}.")
    if status == "single":
        return f"Joint verification: one site kept{after}, measured alone against every site off: {ci}."
    if status == "emptied":
        return f"Joint verification dropped every kept site ({drops}); the stock build stays the answer."
    if status == "none":
        return "Joint verification: no site was kept, nothing to verify."
    return f"Joint verification: not done — {reason}."


def tune_section(tune_out: Mapping[str, Any]) -> list[str]:
    """report.md's Tune section from the tune stage's outputs: per-kernel table, joint line, budget."""
    lines = [f"learned.json: {tune_out.get('learned')}", ""]
    kernels = tune_out.get("kernels")
    if kernels is None:  # a tune stage recorded before the per-kernel outputs existed
        kept = ", ".join(tune_out.get("winners") or []) or "none"
        return [*lines, f"- kept: {kept}; dropped: {tune_out.get('dropped')}"]
    lines += kernel_table(kernels) if kernels else ["No site was tuned."]
    lines += ["", joint_line(tune_out.get("joint"))]
    b = tune_out.get("budget") or {}
    share = b.get("min_share")
    lines.append(f"- budget: {b.get('spent_minutes')} of {b.get('minutes')} min ({b.get('stopped_because')}), "
                 f"{b.get('probes')} probe results"
                 + (f"; split by {b['split']}" if b.get("split") else "")
                 + (f"; --min-share {share:.0%}" if isinstance(share, int | float) else ""))
    return lines


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
        lines += tune_section(tune_out)
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
