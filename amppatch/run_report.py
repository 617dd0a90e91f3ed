"""report.md of `amppatch run`: what ran, what tune kept, the final race per setting, what ships and how to
carry it.

A pure function of the run's options, its stages' outputs and their records, so it is rewritten on every
run (cheap) and tested without running anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.run_race import Decision, LeverVerdict
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
                 + (f"; --min-share {share:.0%}" if isinstance(share, int | float) else "")
                 + (f"; probes of tg{tune_out['probe_tokens']}" if tune_out.get("probe_tokens") else ""))
    return lines


def render_summary(o: RunOptions, outputs: dict[str, dict[str, Any]], stages: Mapping[str, StageRecord]) -> str:
    """report.md of the run: what ran, what tune kept, the final race, what ships and how to carry it."""
    lines = ["# amppatch run", ""]
    prof, tune_out = outputs.get("profile", {}), outputs.get("tune", {})
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
        ops = prof.get("matrix_ops") or {}
        if ops:
            lines.append("- mixture of experts, what drives each hot kernel: "
                         + "; ".join(f"{name}: {label}" for name, label in ops.items()))
    lines += ["", "## Tune", ""]
    if tune_out:
        lines += tune_section(tune_out)
    lines += race_section(o, outputs)
    lines += limit_lines((outputs.get("final") or {}).get("report"))
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name in STAGES[:-1]:
        rec = stages.get(name)
        status = rec.status if rec is not None and rec.status is not None else "—"
        seconds = rec.seconds if rec is not None and rec.seconds is not None else "—"
        lines.append(f"| {name} | {status} | {seconds} |")
    return "\n".join(lines) + "\n"


def _ci_text(ratio: float | None, ci: Any) -> str:
    return f"ratio {ratio:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ratio is not None and ci else "not measured"


def race_section(o: RunOptions, outputs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """## Final race (every comparison at every setting), ## What ships, ## Carrying the patch."""
    final = outputs.get("final") or {}
    lines = ["", "## Final race", ""]
    if not final.get("report"):
        reason = (final or outputs.get("bake") or {}).get("reason", "not run")
        lines.append(f"No final ab-test: {reason}. The stock build stays the answer.")
        if not o.hugepages:
            lines.append(f"- {_pages_not_raced(o.thp_enabled)}")
        return lines
    lines += ["| setting | arm | against | ratio | 95% CI | CI vs 1 | verdict |", "|---|---|---|---|---|---|---|"]
    for setting in final.get("settings") or []:
        for c in (c for c in final.get("comparisons") or [] if c.get("setting") == setting["id"]):
            ci = c.get("ci95")
            side = "—" if not ci else "above 1" if ci[0] > 1 else "below 1" if ci[1] < 1 else "spans 1"
            ratio = f"{c['ratio']:.3f}" if c.get("ratio") is not None else "—"
            cis = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"
            verdict = c.get("verdict") if c.get("ratio") is not None else f"not measured ({c.get('unavailable')})"
            lines.append(f"| {setting['label']} | {c.get('arm')} | {c.get('baseline')} | {ratio} | {cis} | {side} "
                         f"| {verdict} |")
    labels = {s["id"]: s["label"] for s in final.get("settings") or []}
    for f in final.get("not_measured") or []:
        if f.get("arm") == "stock":
            lines += ["", f"Not measured: {labels.get(f.get('setting'), f.get('setting'))} — this build cannot run "
                          f"it here ({f.get('reason')})."]
    lines += ["", f"Full report: {final['report']}/report.md"]
    if not final.get("decision"):  # a final stage recorded without the keep rule's decision
        return lines
    decision = Decision.from_json(final["decision"])
    return lines + ships_section(o, outputs, decision) + carry_section(outputs, decision, final.get("cpu_model"))


def _pages_not_raced(thp: str | None) -> str:
    why = "THP is never on this machine" if thp == "never" else "this kernel offers no transparent huge pages"
    return f"huge pages: {why} — not raced, stock behaviour"


# A lever whose CI at the primary setting still reaches above this gain was not refuted, only not resolved.
UNRESOLVED_GAIN = 0.05


def lever_line(v: LeverVerdict) -> str:
    """One lever's keep-rule verdict in plain words."""
    name = "huge pages" if v.lever == "hugepages" else v.lever
    head = v.primary
    where = f"{v.arm} against {v.baseline}" + (f" at {head.setting_label}" if head else "")
    if v.why == "gain":
        assert head is not None
        return f"{name}: kept — {_ci_text(head.ratio, head.ci95)} ({where}), no setting below 1"
    if v.why == "hurts":
        hurt = "; ".join(f"{h.setting_label}: {_ci_text(h.ratio, h.ci95)}" for h in v.hurts)
        return f"{name}: not kept — slower at {hurt} ({v.arm} against {v.baseline})"
    if v.why == "no-gain":
        assert head is not None and head.ci95 is not None
        if head.ci95[1] > 1.0 + UNRESOLVED_GAIN:
            # the CI still holds a worthwhile gain: the race could not tell, which is not "no gain"
            return (f"{name}: not shown here, {_ci_text(head.ratio, head.ci95)} ({where}) — the CI spans 1 and a "
                    f"gain above {UNRESOLVED_GAIN:.0%}: the race was too short to tell (rerun with a larger "
                    "--final-minutes; the rounds done are kept)")
        return f"{name}: no gain here, {_ci_text(head.ratio, head.ci95)} ({where})"
    return f"{name}: not kept — not measured at the primary setting ({v.arm} against {v.baseline})"


def ships_section(o: RunOptions, outputs: Mapping[str, Mapping[str, Any]], decision: Decision) -> list[str]:
    """What ships, and each lever's verdict (a lever that was not raced says why)."""
    baked = (outputs.get("bake") or {}).get("arms") or {}
    lines = ["", "## What ships", ""]
    if decision.ships == "stock":
        lines.append("Ships: **stock** — no lever proved a gain in this race; there is nothing to carry.")
    else:
        names = {"prefetch": "prefetch", "pages": "huge pages", "both": "prefetch + huge pages"}
        lines.append(f"Ships: **{names[decision.ships]}** (arm `{decision.ships}`); patch: "
                     f"`{baked.get(decision.ships, {}).get('patch')}`")
    prefetch, pages = decision.lever("prefetch"), decision.lever("hugepages")
    lines.append(f"- {lever_line(prefetch)}" if prefetch else "- prefetch: tune kept no site — not raced")
    if pages is not None:
        lines.append(f"- {lever_line(pages)}")
    elif not o.hugepages:
        lines.append(f"- {_pages_not_raced(o.thp_enabled)}")
    for arm in ("pages", "both"):
        check = (baked.get(arm) or {}).get("hugepages")
        if check:
            share = check.get("share_b")
            lines.append(f"- huge-page mapping of the {arm} build (apply's check on the gate model): "
                         f"{check.get('status')}"
                         + (f", {share:.0%} of the mapped file on huge pages" if isinstance(share, float) else "")
                         + (f" — {check['note']}" if check.get("note") else ""))
    return lines


def cmake_flags(flags: Mapping[str, Any]) -> str:
    """The configure flags a build was made with, as a `cmake` command line fragment."""
    parts = [f"-D{k}={v}" for k, v in (flags.get("cmake_options") or {}).items()]
    common = " ".join(filter(None, ["-g", flags.get("cflags") or ""]))
    parts += [f'-DCMAKE_C_FLAGS="{common}"', f'-DCMAKE_CXX_FLAGS="{common}"']
    return " ".join(parts)


def carry_section(outputs: Mapping[str, Mapping[str, Any]], decision: Decision, cpu: str | None) -> list[str]:
    """How to take the shipped patch to another checkout, and why to measure again there."""
    arm = (outputs.get("bake") or {}).get("arms", {}).get(decision.ships)
    if decision.ships == "stock" or not arm:
        return []
    flags = arm.get("build_flags") or {}
    lines = ["", "## Carrying the patch", "",
             f"Apply it to your llama.cpp checkout (made on commit {str(arm.get('base_commit'))[:12]}; a "
             "`git format-patch` file, so `git am` commits it and `git apply` leaves it uncommitted):", "",
             f"    git -C <your llama.cpp checkout> am {arm.get('patch')}", "",
             f"- measured with the CMake flags `{cmake_flags(flags)}`"]
    kernel = " ".join(flags.get("kernel_flags_applied") or [])
    if kernel:
        lines.append(f"- and, on the ggml-cpu target only, `{kernel}` (--kernel-cflags and this CPU's ISA probe; "
                     "amppatch adds them through a CMake project include)")
    if flags.get("pgo"):
        lines.append("- the measured builds were profile-guided (PGO): a build without it may measure differently")
    if decision.ships in ("prefetch", "both"):
        lines.append(f"- the prefetch distances and hints were tuned for this CPU ({cpu or 'unknown CPU'}); "
                     "another CPU may want others")
    if decision.ships in ("pages", "both"):
        lines.append("- huge pages need THP `madvise` or `always` on the machine that runs it (with `never` the "
                     "patched build maps the weights as stock does)")
    lines.append("- re-run the race on your own machine before trusting it there: build both trees with "
                 "`amppatch build --repo <checkout>`, then "
                 "`amppatch ab-test --a <stock build> --b <patched build> -m <model> --threads 1,2`")
    return lines


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
