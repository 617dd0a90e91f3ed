"""`AbTestResult`: the typed result of an ab-test, and the one reader and writer of its report.json.

`run_abtest` returns it; later stages (tune's prober, run's final stage, the bench) use its fields instead of
re-reading the file, and every file is read back only through `AbTestResult.from_json` (validated by the
shared checker, `amppatch.inputs.REPORT`). `to_json()` gives the report.json document (docs/report-schema.md)
with the keys in the order they were written or read, so `from_json(doc).to_json() == doc`: fields the
readers use are typed, the rest of each object rides along unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amppatch.inputs import REPORT, check_json, read_json
from amppatch.jsondoc import jsonable, ordered, rest_of
from amppatch.limit import ModelRoofline
from amppatch.weightpages import WeightPages

REPORT_JSON = "report.json"
Ci95 = tuple[float, float] | None


def _ci(value: Any) -> Ci95:
    return None if value is None else (value[0], value[1])


@dataclass(frozen=True)
class SettingRecord:
    """One measured setting (`settings[]`); the first is the headline setting."""

    id: str
    label: str
    test: str
    threads: int
    n_tokens: int
    depth: int = 0
    order: tuple[str, ...] = ("id", "label", "test", "threads", "n_tokens", "depth")
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("id", "label", "test", "threads", "n_tokens", "depth")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SettingRecord:
        return cls(doc["id"], doc["label"], doc["test"], doc["threads"], doc["n_tokens"], doc.get("depth", 0),
                   tuple(doc), rest_of(doc, cls._TYPED))

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"id": self.id, "label": self.label, "test": self.test,
                                     "threads": self.threads, "n_tokens": self.n_tokens, "depth": self.depth},
                        self.rest)


@dataclass(frozen=True)
class ArmResult:
    """One arm (`arms[]`): its headline median and samples, and its statistics at every setting."""

    name: str
    median_tok_s: float | None
    samples_ns: tuple[int, ...]
    by_setting: dict[str, dict[str, Any]]
    build_dir: str | None = None
    bench_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("name", "median_tok_s", "samples_ns", "by_setting", "build_dir", "bench_args", "env")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ArmResult:
        return cls(doc["name"], doc.get("median_tok_s"), tuple(doc.get("samples_ns") or ()),
                   dict(doc.get("by_setting") or {}), doc.get("build_dir"), tuple(doc.get("bench_args") or ()),
                   dict(doc.get("env") or {}), tuple(doc), rest_of(doc, cls._TYPED))

    def at(self, setting: str) -> dict[str, Any]:
        """This arm's statistics at `setting` ({} when it has none)."""
        return self.by_setting.get(setting) or {}

    @property
    def huge_pages(self) -> WeightPages | None:
        """How much of the model file sat on huge pages in this arm's watched warmup (None: an older report)."""
        doc = self.rest.get("huge_pages")
        return WeightPages.from_json(doc) if isinstance(doc, dict) else None

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"name": self.name, "median_tok_s": self.median_tok_s,
                                     "samples_ns": list(self.samples_ns), "by_setting": self.by_setting,
                                     "build_dir": self.build_dir, "bench_args": list(self.bench_args),
                                     "env": self.env}, self.rest)


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline at one setting (`comparisons[]`)."""

    arm: str
    baseline: str
    setting: str
    setting_label: str | None
    verdict: str
    ratio: float | None
    ci95: Ci95
    n_blocks: int | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("arm", "baseline", "setting", "setting_label", "verdict", "ratio", "ci95", "n_blocks")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Comparison:
        return cls(doc["arm"], doc["baseline"], doc["setting"], doc.get("setting_label"),
                   doc.get("verdict", "unavailable"), doc.get("ratio"), _ci(doc.get("ci95")), doc.get("n_blocks"),
                   tuple(doc), rest_of(doc, cls._TYPED))

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"arm": self.arm, "baseline": self.baseline, "setting": self.setting,
                                     "setting_label": self.setting_label, "verdict": self.verdict,
                                     "ratio": self.ratio, "ci95": None if self.ci95 is None else list(self.ci95),
                                     "n_blocks": self.n_blocks}, self.rest)

    @property
    def unavailable(self) -> str | None:
        """Why the comparison could not be measured (an arm failed), or None."""
        return self.rest.get("unavailable")

    @property
    def resolution(self) -> float | None:
        return self.rest.get("resolution")

    @property
    def p_value(self) -> float | None:
        return self.rest.get("p_value")


@dataclass(frozen=True)
class GateRecord:
    """The correctness gate of one arm against the baseline (`correctness[]`)."""

    arm: str
    baseline: str
    mode: str | None
    passed: bool | None
    detail: str
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("arm", "baseline", "mode", "passed", "detail")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GateRecord:
        return cls(doc.get("arm", ""), doc.get("baseline", ""), doc.get("mode"), doc.get("passed"),
                   doc.get("detail", ""), tuple(doc), rest_of(doc, cls._TYPED))

    def to_json(self) -> dict[str, Any]:
        return ordered(self.order, {"arm": self.arm, "baseline": self.baseline, "mode": self.mode,
                                     "passed": self.passed, "detail": self.detail}, self.rest)


@dataclass(frozen=True)
class AbTestResult:
    """An ab-test's report (docs/report-schema.md) as typed fields; `path` is the report directory."""

    schema_version: int
    verdict: str
    ratio: float | None
    ci95: Ci95
    headline: dict[str, Any] | None
    options: dict[str, Any]
    settings: tuple[SettingRecord, ...]
    arms: tuple[ArmResult, ...]
    comparisons: tuple[Comparison, ...]
    correctness: tuple[GateRecord, ...]
    diagnostics: dict[str, Any]
    samples: tuple[dict[str, Any], ...]
    roofline: ModelRoofline | None = None  # None: a report written before ab-test measured it
    path: Path | None = None
    order: tuple[str, ...] = ()
    rest: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("schema_version", "verdict", "ratio", "ci95", "headline", "options", "settings", "arms",
              "comparisons", "correctness", "diagnostics", "samples", "roofline")

    @classmethod
    def from_json(cls, doc: Any, path: Path | None = None) -> AbTestResult:
        """The result of a report.json document, checked as `amppatch.inputs.REPORT` (a UsageError naming
        the file otherwise); `path` is the report directory (or the report's file)."""
        where = Path(path or ".") / REPORT_JSON
        if path is not None and Path(path).suffix == ".json":  # the file itself (e.g. a committed copy)
            where, path = Path(path), Path(path).parent
        doc = check_json(jsonable(doc), where, REPORT)
        roofline = doc.get("roofline")
        typed = cls._TYPED if isinstance(roofline, dict) else cls._TYPED[:-1]  # anything else rides along as read
        return cls(doc["schema_version"], doc["verdict"], doc.get("ratio"), _ci(doc.get("ci95")),
                   doc.get("headline"), dict(doc["options"]),
                   tuple(SettingRecord.from_json(s) for s in doc["settings"]),
                   tuple(ArmResult.from_json(a) for a in doc["arms"]),
                   tuple(Comparison.from_json(c) for c in doc.get("comparisons") or ()),
                   tuple(GateRecord.from_json(g) for g in doc.get("correctness") or ()),
                   dict(doc.get("diagnostics") or {}), tuple(doc["samples"]),
                   ModelRoofline.from_json(roofline) if isinstance(roofline, dict) else None,
                   path, tuple(doc), rest_of(doc, typed))

    @classmethod
    def read(cls, path: Path) -> AbTestResult:
        """The result stored in `path` (a report directory or its report.json)."""
        path = Path(path).expanduser()
        file = path if path.name == REPORT_JSON else path / REPORT_JSON
        return cls.from_json(read_json(file, REPORT), file.parent)

    def to_json(self) -> dict[str, Any]:
        """The report.json document, keys in the file's order."""
        typed = {
            "schema_version": self.schema_version, "verdict": self.verdict, "ratio": self.ratio,
            "ci95": None if self.ci95 is None else list(self.ci95), "headline": self.headline,
            "options": self.options, "settings": [s.to_json() for s in self.settings],
            "arms": [a.to_json() for a in self.arms], "comparisons": [c.to_json() for c in self.comparisons],
            "correctness": [g.to_json() for g in self.correctness], "diagnostics": self.diagnostics,
            "samples": list(self.samples),
        }
        if self.roofline is not None:  # an older report has no such key, and gets none
            typed["roofline"] = self.roofline.to_json()
        return ordered(self.order, typed, self.rest)

    def dumps(self) -> str:
        """report.json's text."""
        return json.dumps(self.to_json(), indent=1) + "\n"

    def arm(self, name: str) -> ArmResult | None:
        return next((a for a in self.arms if a.name == name), None)

    @property
    def pair_comparisons(self) -> tuple[Comparison, ...]:
        """The comparisons of `options.pairs`: an arm against another arm than the first."""
        return tuple(Comparison.from_json(c) for c in self.rest.get("pair_comparisons") or ())

    def comparison(self, arm: str, setting: str | None = None) -> Comparison | None:
        """The comparison of `arm` (at `setting`, or its first)."""
        return next((c for c in self.comparisons if c.arm == arm and setting in (None, c.setting)), None)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The (arm, setting, reason) records of every arm that could not be measured at some setting."""
        return [f for f in self.diagnostics.get("failures") or [] if isinstance(f, dict)]

    @property
    def min_effect(self) -> float | None:
        return self.options.get("min_effect")

    @property
    def warnings(self) -> list[str]:
        return list(self.diagnostics.get("warnings") or [])
