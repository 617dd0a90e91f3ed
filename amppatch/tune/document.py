"""learned.json as `amppatch tune` writes it (schema 2; docs/report-schema.md describes every key).

The document is rebuilt from the sites' outcomes on every write — after each site, after each extension,
after the joint verification and on an interrupt — so a tune that stops early keeps what it reached."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch import __version__
from amppatch.learned import Learned
from amppatch.paths import write_text_atomic
from amppatch.tune.budget import Budget
from amppatch.tune.joint import JointOutcome
from amppatch.tune.passes import SiteOutcome
from amppatch.tune.search import RULE, SearchConfig, best_result

if TYPE_CHECKING:
    from amppatch.build import Build
    from amppatch.patch.manifest import ApplyManifest
    from amppatch.tune import TuneOptions

SCHEMA_VERSION = 2
_SITE_ID = ("key", "function", "loop", "stream")


def _code_path(build_manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("key", "compiler", "compiler_version", "cflags", "kernel_cflags", "cmake_options", "pgo",
            "isa_features", "commit")
    return {k: build_manifest.get(k) for k in keys if k in build_manifest}


def _minutes(seconds: float) -> float:
    return round(seconds / 60, 2)


def site_record(o: SiteOutcome, threads: int, probes: list[int], keys: Mapping[int, str]) -> dict[str, Any]:
    """learned.json's entry for one site (`probes`: indices into the document's probe list; `keys`: every
    site's key by index)."""
    site, search = o.site, o.search
    best = best_result(search.results, threads) if search else None
    ev = o.evidence(threads)
    no_samples = {"samples_ns": None, "off_samples_ns": None}
    record = {
        **{k: site.get(k) for k in _SITE_ID}, "file": site.get("file"), "env": site.get("env"),
        "start": {"distance_bytes": o.start.distance, "hint": o.start.hint},
        "share": o.share, "kept": o.kept, "reason": o.reason, "dropped_by": o.dropped_by,
        "confirmed": search.confirmed if search else False,
        "stopped_because": search.stopped_because if search else "not tuned",
        "phases_skipped": list(search.phases_skipped) if search else [],
        "best": best.to_json() | no_samples if best else None,
        "evidence": {str(t): r.to_json() | no_samples for t, r in search.by_threads.items()} if search else {},
        "contribution": None if ev is None or ev.ratio is None else {
            "distance_bytes": ev.candidate.distance, "hint": ev.candidate.hint, "threads": threads,
            "phase": ev.phase, "ratio": ev.ratio, "ci95": list(ev.ci95) if ev.ci95 else None},
        "tuned_with": [keys[i] for i in sorted(o.with_on) if i in keys],
        "budget": {"allotted_minutes": _minutes(o.allotted), "extension_minutes": _minutes(o.extension),
                   "spent_minutes": _minutes(o.spent)},
        "probes": probes,
        "winner": None,
    }
    if search is not None and search.winner is not None and o.kept:
        record["winner"] = {"distance_bytes": search.winner.distance, "hint": search.winner.hint,
                            "ratio": ev.ratio if ev else None,
                            "ci95": list(ev.ci95) if ev and ev.ci95 else None,
                            "ratio_by_threads": {str(t): r.ratio for t, r in search.by_threads.items()}}
    return record


@dataclass
class LearnedWriter:
    """learned.json of one tune, written whenever the outcomes change."""

    path: Path
    options: TuneOptions
    manifest: ApplyManifest
    build: Build
    config: SearchConfig
    budget: Budget
    outcomes: Sequence[SiteOutcome]
    split: str  # "kernel share" or "equal"
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    joint: JointOutcome | None = None

    def sites_and_probes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        threads = self.options.threads
        keys = {o.index: o.key for o in self.outcomes}
        sites: list[dict[str, Any]] = []
        probes: list[dict[str, Any]] = []
        for o in sorted((o for o in self.outcomes if o.settled), key=lambda o: (o.search is None, -o.weight)):
            first = len(probes)
            probes += [{"site": o.key, **r.to_json()} for r in (o.search.results if o.search else [])]
            sites.append(site_record(o, threads, list(range(first, len(probes))), keys))
        return sites, probes

    def joint_json(self, stopped: str) -> dict[str, Any]:
        if self.joint is not None:
            return self.joint.to_json()
        return {"status": "not run", "sites": [o.key for o in self.outcomes if o.kept], "threads":
                self.options.threads, "ratio": None, "ci95": None,
                "reason": f"tune stopped before the joint verification ({stopped})", "steps": [], "dropped": []}

    def write(self, stopped: str) -> Learned:
        from amppatch.machine import cpu_model

        options, manifest, config, budget = self.options, self.manifest, self.config, self.budget
        sites, probes = self.sites_and_probes()
        winners = [r["winner"] | {k: r[k] for k in (*_SITE_ID, "file", "share")} for r in sites if r["kept"]]
        data = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "amppatch", "version": __version__, "command": "tune"},
            "created_utc": self.started,
            "options": options.to_json(),
            "rule": RULE,
            "search": {"grid": list(config.grid), "line_size": config.line_size, "hints": list(config.hints),
                       "secondary_hints": list(config.secondary_hints), "refine_levels": config.refine_levels},
            "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count()},
            "code_path": _code_path(self.build.manifest),
            "repo": str(options.repo),
            "base_commit": manifest.base_commit,
            "tunable": {"manifest": str(manifest.path), "branch": manifest.branch,
                        "commit": manifest.commit, "build": str(self.build.dir),
                        "stock_build": manifest.build_a},
            "model": str(options.model),
            "threads": options.threads,
            "verify_threads": list(options.verify_threads or ()),
            "budget": {"minutes": options.budget_minutes, "spent_minutes": _minutes(budget.spent()),
                       "lock_wait_minutes": _minutes(budget.lock_waited),
                       "exhausted": budget.remaining() <= 0 or any(r["phases_skipped"] for r in sites),
                       "stopped_because": stopped, "split": self.split, "min_share": options.min_share,
                       "shares_from": str(options.profile) if options.profile else None},
            "sites": sites,
            "probes": probes,
            "winners": winners,
            "dropped": [{k: r[k] for k in _SITE_ID} | {k: r[k] for k in ("reason", "dropped_by", "share",
                                                                         "contribution", "best")}
                        for r in sites if not r["kept"]],
            "joint": self.joint_json(stopped),
        }
        text = json.dumps(data, indent=1, default=str) + "\n"
        write_text_atomic(self.path, text)
        return Learned.from_json(json.loads(text), self.path)  # the document as written (paths as text)
