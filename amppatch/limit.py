"""How close token generation runs to its limit, and on which pages its weights sat.

The limit is the roofline: the lower of two rates. One is the weight kernels' own throughput with
cache-resident weights (`amppatch.roofline`: one n = 1 MUL_MAT, weight bytes consumed per second); the other
is the machine's stream-read ceiling (`amppatch.machine`: the best stream read on 4 KiB pages and on
transparent huge pages). ab-test and profile measure it for the model they run: the weight types that cover
most of the bytes a token reads (`pick_kernels`), each at the row width most of its bytes have, at every
thread count, on one build — a short probe (`QUICK_REPEATS` × `QUICK_SECONDS` per size), since it only has
to say which side binds and how far each arm is from it. A model of several types consumes cache-resident
weights at the byte-weighted harmonic mean of its kernels' rates (`combined_gbps`): every type's bytes take
their own time.

`ModelRoofline` is the typed record (report.json's and profile.json's `roofline`); where the weights sat is
`amppatch.weightpages.WeightPages`. Everything here is pure except `measure_kernels` and `measure_model`, which
run the roofline probe (and the machine probe, cached).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.inputs import check_schema_version
from amppatch.jsondoc import jsonable
from amppatch.roofline import MIB, TYPE_BLOCK, RooflineResult, binds

if TYPE_CHECKING:
    from amppatch.gguf_info import GgufInfo

SCHEMA_VERSION = 1
COVER = 0.8  # the picked types cover at least this share of a token's weight bytes ...
MAX_KERNELS = 3  # ... or this many types, whichever comes first
QUICK_REPEATS = 3  # the probe's minimum: a median and a spread
QUICK_SECONDS = 0.2  # per measurement: with the fill of the streaming matrix, a few seconds per kernel
ROUND = 4  # decimals kept of every rate, so a record read back computes the same shares


# Below this median CPU share of its threads, an in-cache probe is not used as the kernel side.
MIN_CLEAN_CPU_SHARE = 0.75


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), ROUND)


@dataclass(frozen=True)
class KernelPick:
    """One weight type to measure: at the row width most of its bytes have."""

    type: str  # ggml type name, lower case as the probe takes it (q8_0)
    width: int  # row width (ne0) of the weight matrices
    bytes_per_token: int  # weight bytes of this type one generated token reads
    share: float  # of all the matrix weight bytes a token reads
    width_share: float  # of this type's bytes, the share in matrices of `width`

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "width": self.width, "bytes_per_token": self.bytes_per_token,
                "share": round(self.share, 6), "width_share": round(self.width_share, 6)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KernelPick:
        return cls(str(data["type"]), int(data["width"]), int(data["bytes_per_token"]), float(data["share"]),
                   float(data["width_share"]))


def pick_kernels(info: GgufInfo, *, cover: float = COVER,
                 max_kernels: int = MAX_KERNELS) -> tuple[list[KernelPick], list[str]]:
    """The model's dominant weight kernels: types by the bytes a token reads of them (MoE: the routed experts'
    slices; gathered tables excluded), largest first, until `cover` of the bytes or `max_kernels` types; each
    at its commonest row width. Types the probe cannot fill are skipped with a note (they still count toward
    `cover`, so a minor type never stands in for them)."""
    from amppatch.gguf_info import weight_reads

    widths: dict[str, dict[int, int]] = {}
    for tensor, n in weight_reads(info):
        if len(tensor.shape) < 2 or n <= 0:  # norms and biases: no matrix product streams them
            continue
        per_width = widths.setdefault(tensor.type.lower(), {})
        per_width[tensor.shape[0]] = per_width.get(tensor.shape[0], 0) + n
    total = sum(sum(w.values()) for w in widths.values())
    picks: list[KernelPick] = []
    notes: list[str] = []
    considered = 0
    for kind, per_width in sorted(widths.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])):
        if considered >= cover * total or len(picks) >= max_kernels:
            break
        n = sum(per_width.values())
        considered += n
        if kind not in TYPE_BLOCK:
            notes.append(f"{kind} ({n / total:.0%} of the weight bytes per token): the roofline probe cannot fill "
                         "this type, so its kernel is not measured")
            continue
        width, at_width = max(per_width.items(), key=lambda kv: (kv[1], kv[0]))
        picks.append(KernelPick(kind, width, n, n / total, at_width / n))
    return picks, notes


def combined_gbps(parts: Sequence[tuple[int, float]]) -> float | None:
    """The rate at which weights split into (bytes, GB/s) parts are consumed when each part takes its own time:
    Σ bytes / Σ (bytes / rate) — the byte-weighted harmonic mean. None without a positive part."""
    parts = [(b, g) for b, g in parts if b > 0 and g > 0]
    if not parts:
        return None
    return sum(b for b, _ in parts) / sum(b / g for b, g in parts)


@dataclass(frozen=True)
class StreamCeilings:
    """The machine probe's best stream read at one thread count, on 4 KiB pages and on huge pages."""

    page_4k_gbps: float | None
    huge_gbps: float | None  # None where THP is `never` (the probe's huge-page request had no effect)
    threads: int | None  # the thread count they were measured at (the nearest the probe ran)

    @property
    def best_gbps(self) -> float | None:
        values = [v for v in (self.page_4k_gbps, self.huge_gbps) if v]
        return max(values) if values else None


def stream_ceilings(rows: Sequence[Mapping[str, Any]], threads: int, thp_mode: str = "") -> StreamCeilings:
    """The best stream-read GB/s of the machine probe's rows (`MachineInfo.stream`: threads, thp, gbps) at
    `threads` — else the nearest count below, then above — with THP forbidden (4 KiB pages) and asked for."""
    counts = sorted({int(r["threads"]) for r in rows if r.get("kind", "stream") == "stream"})
    if not counts:
        return StreamCeilings(None, None, None)
    below = [t for t in counts if t <= threads]
    at = max(below) if below else min(counts)

    def best(thp: int) -> float | None:
        values = [float(r["gbps"]) for r in rows
                  if int(r["threads"]) == at and int(r.get("thp", 0)) == thp and r.get("kind", "stream") == "stream"]
        return _r(max(values)) if values else None

    return StreamCeilings(best(0), None if thp_mode == "never" else best(1), at)


@dataclass(frozen=True)
class MeasuredKernel:
    """One picked kernel at one thread count: the probe's result, or why it has none."""

    pick: KernelPick
    threads: int
    result: RooflineResult | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.pick.to_json(), "threads": self.threads,
                "in_cache_gbps": self.result.in_cache_gbps if self.result else None,
                "result": self.result.to_json() if self.result else None, "error": self.error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasuredKernel:
        result = data.get("result")
        return cls(KernelPick.from_json(data), int(data["threads"]),
                   RooflineResult.from_json(result) if result else None, data.get("error"))


@dataclass(frozen=True)
class SettingLimit:
    """The roofline at one setting (its thread count) and every arm's achieved GB/s against it."""

    setting: str
    label: str
    threads: int
    in_cache_gbps: float | None  # the picked kernels combined (combined_gbps)
    ceilings: StreamCeilings
    arms: tuple[tuple[str, float | None], ...] = ()  # (arm, GB/s = bytes read per token × median tok/s)

    @property
    def stream_gbps(self) -> float | None:
        return self.ceilings.best_gbps

    @property
    def roofline_gbps(self) -> float | None:
        """The lower side: what no arm can exceed (the side that exists, when only one was measured)."""
        sides = [v for v in (self.in_cache_gbps, self.stream_gbps) if v]
        return min(sides) if sides else None

    @property
    def binds(self) -> str | None:
        """"kernel" or "memory" (amppatch.roofline.binds); None unless both sides were measured."""
        return binds(self.in_cache_gbps, self.stream_gbps) if self.in_cache_gbps else None

    def share(self, gbps: float | None) -> float | None:
        limit = self.roofline_gbps
        return _r(gbps / limit) if gbps and limit else None

    def to_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "label": self.label, "threads": self.threads,
                "in_cache_gbps": self.in_cache_gbps, "stream_4k_gbps": self.ceilings.page_4k_gbps,
                "stream_huge_gbps": self.ceilings.huge_gbps, "ceiling_threads": self.ceilings.threads,
                "roofline_gbps": self.roofline_gbps, "binds": self.binds,
                "arms": [{"arm": a, "gb_per_s": g, "share_of_roofline": self.share(g)} for a, g in self.arms]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SettingLimit:
        ceilings = StreamCeilings(data.get("stream_4k_gbps"), data.get("stream_huge_gbps"), data.get("ceiling_threads"))
        return cls(str(data["setting"]), str(data["label"]), int(data["threads"]), data.get("in_cache_gbps"),
                   ceilings, tuple((str(a["arm"]), a.get("gb_per_s")) for a in data.get("arms") or ()))


@dataclass(frozen=True)
class SettingRates:
    """What the caller knows of one setting before the roofline is assembled: its thread count and every
    arm's achieved GB/s (None: not measured)."""

    setting: str
    label: str
    threads: int
    arms: tuple[tuple[str, float | None], ...] = ()


@dataclass(frozen=True)
class ModelRoofline:
    """The roofline of a model's dominant weight kernels per setting (report.json's and profile.json's
    `roofline`); `available` is False, with the reason in `note`, when it was not measured."""

    available: bool
    note: str
    build_dir: str | None = None
    kernels: tuple[MeasuredKernel, ...] = ()
    settings: tuple[SettingLimit, ...] = ()
    notes: tuple[str, ...] = ()  # types skipped, failed or contended measurements
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def unavailable(cls, note: str) -> ModelRoofline:
        return cls(False, note)

    @property
    def measured_share(self) -> float:
        """Share of a token's matrix weight bytes whose kernel was measured (at some thread count)."""
        seen = {k.pick.type: k.pick.share for k in self.kernels if k.result is not None}
        return sum(seen.values())

    def setting(self, setting_id: str) -> SettingLimit | None:
        return next((s for s in self.settings if s.setting == setting_id), None)

    def to_json(self) -> dict[str, Any]:
        return jsonable({"schema_version": self.schema_version, "available": self.available, "note": self.note,
                         "build_dir": self.build_dir, "measured_share": round(self.measured_share, 6),
                         "kernels": [k.to_json() for k in self.kernels],
                         "settings": [s.to_json() for s in self.settings], "notes": list(self.notes)})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelRoofline:
        again = "re-run the command that wrote it with this amppatch"
        check_schema_version(dict(data), SCHEMA_VERSION, what="the roofline record", next_step=again)
        try:
            return cls(bool(data["available"]), str(data.get("note", "")), data.get("build_dir"),
                       tuple(MeasuredKernel.from_json(k) for k in data.get("kernels") or ()),
                       tuple(SettingLimit.from_json(s) for s in data.get("settings") or ()),
                       tuple(str(n) for n in data.get("notes") or ()))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UsageError(f"the roofline record is malformed ({type(exc).__name__}: {exc})",
                             next_step=again) from None


def assemble(kernels: Sequence[MeasuredKernel], settings: Sequence[SettingRates],
             stream_rows: Sequence[Mapping[str, Any]], *, thp_mode: str = "", build_dir: str | None = None,
             notes: Sequence[str] = ()) -> ModelRoofline:
    """The roofline record from measured kernels, the machine probe's stream rows and each setting's arms."""
    from amppatch.roofline import contention_warnings

    out = []
    # A kernel probe that got much less than its threads' CPU measured the scheduler, not the kernel (at 2
    # threads on a busy 2-core machine its rate collapses at ggml's barriers): it does not set the roofline.
    clean = [k for k in kernels if k.result is not None and k.result.in_cache.median_cpu_share >= MIN_CLEAN_CPU_SHARE]
    dropped = [f"{k.pick.type} at {k.threads} thread(s): in-cache rate left out of the roofline (CPU share "
               f"{k.result.in_cache.median_cpu_share:.2f} < {MIN_CLEAN_CPU_SHARE}); that setting's roofline is the "
               "stream ceiling alone" for k in kernels if k.result is not None and k not in clean]
    for s in settings:
        parts = [(k.pick.bytes_per_token, k.result.in_cache_gbps) for k in clean
                 if k.threads == s.threads and k.result is not None]
        out.append(SettingLimit(s.setting, s.label, s.threads, _r(combined_gbps(parts)),
                                stream_ceilings(stream_rows, s.threads, thp_mode),
                                tuple((a, _r(g)) for a, g in s.arms)))
    failed = [f"{k.pick.type} width {k.pick.width} at {k.threads} thread(s): {k.error}" for k in kernels if k.error]
    contended = contention_warnings([k.result for k in kernels if k.result is not None])
    above = [f"{a} at {s.label} ran at {s.share(g):.0%} of the roofline: above the limit, so a side was measured "
             "low (the kernel under CPU contention, see the notes, or a ceiling below what this run streamed)"
             for s in out for a, g in s.arms if (s.share(g) or 0) > 1]
    measured = any(k.result is not None for k in kernels)
    note = "measured" if measured else "no kernel could be measured"
    return ModelRoofline(measured, note, build_dir, tuple(kernels), tuple(out),
                         (*notes, *failed, *contended, *dropped, *above))


def measure_kernels(build: Path, picks: Sequence[KernelPick], threads: Sequence[int], *, buffer: str = "auto",
                    ceilings: Mapping[int, float | None] | None = None) -> list[MeasuredKernel]:
    """Run the roofline probe of `build` for every pick at every thread count (short: QUICK_REPEATS ×
    QUICK_SECONDS per size, the streaming matrix twice the LLC). A kernel that cannot be measured carries
    its error instead of failing the caller."""
    from amppatch.proc import progress
    from amppatch.roofline import RooflineOptions, machine_sizes, measure_roofline

    out: list[MeasuredKernel] = []
    for pick in picks:
        for t in sorted(set(threads)):
            try:
                _, stream, llc = machine_sizes(t)
                options = RooflineOptions(build=build, type=pick.type, width=pick.width, threads=t, buffer=buffer,
                                          stream_bytes=min(stream, max(2 * llc, 256 * MIB)),
                                          repeats=QUICK_REPEATS, seconds=QUICK_SECONDS,
                                          stream_ceiling_gbps=(ceilings or {}).get(t))
                out.append(MeasuredKernel(pick, t, measure_roofline(options)))
            except AmppatchError as exc:
                progress(f"roofline: {pick.type} width {pick.width} at {t} thread(s) not measured: {exc.message}")
                out.append(MeasuredKernel(pick, t, None, exc.message))
    return out


@dataclass(frozen=True)
class KernelRun:
    """The measured side of a model's roofline, before the settings' arms are known: the kernels, the machine
    probe's stream rows and THP mode, the build, and notes (skipped types, a probe that could not run)."""

    kernels: tuple[MeasuredKernel, ...]
    stream_rows: tuple[Mapping[str, Any], ...]
    thp_mode: str
    build_dir: str
    notes: tuple[str, ...] = ()

    def assemble(self, settings: Sequence[SettingRates]) -> ModelRoofline:
        return assemble(self.kernels, settings, self.stream_rows, thp_mode=self.thp_mode, build_dir=self.build_dir,
                        notes=self.notes)


def measure_model(build: Path, info: GgufInfo, threads: Sequence[int], *, buffer: str = "auto") -> KernelRun:
    """The model's dominant weight kernels (`pick_kernels`) measured on `build` at every thread count, with the
    machine probe's stream ceilings (cached after its first run). ab-test and profile both call this."""
    from amppatch.machine import probe_machine

    picks, notes = pick_kernels(info)
    rows: tuple[Mapping[str, Any], ...] = ()
    thp_mode = ""
    ceilings: dict[int, float | None] = {}
    try:
        machine = probe_machine()
        rows, thp_mode = tuple(machine.stream), machine.thp_mode
        ceilings = {t: stream_ceilings(rows, t, thp_mode).best_gbps for t in threads}
    except AmppatchError as exc:
        notes.append(f"no stream ceilings: the machine probe failed ({exc.message})")
    if not picks:
        notes.append("the model has no weight matrix of a type the roofline probe can fill")
    kernels = measure_kernels(build, picks, threads, buffer=buffer, ceilings=ceilings)
    return KernelRun(tuple(kernels), rows, thp_mode, str(build), tuple(notes))


# ----------------------------------------------------------------------------------------------------------
# Rendering (Markdown lines, shared by ab-test's report.md, run's report.md and profile's summary)


def _gbps(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def kernel_lines(part: ModelRoofline) -> list[str]:
    """One line per measured kernel: type, width, byte share, buffer → kernel, in-cache GB/s per thread count."""
    lines = []
    by_pick: dict[tuple[str, int], list[MeasuredKernel]] = {}
    for k in part.kernels:
        by_pick.setdefault((k.pick.type, k.pick.width), []).append(k)
    for (kind, width), ks in by_pick.items():
        pick = ks[0].pick
        rates = "; ".join(
            f"{k.threads} thread(s) {k.result.in_cache_gbps:.2f} GB/s in cache, "
            f"{k.result.streaming_gbps:.2f} GB/s streaming on 4 KiB pages" if k.result else
            f"{k.threads} thread(s) not measured" for k in ks)
        where = next((f"{k.result.buffer_type} → {k.result.kernel_path}" for k in ks if k.result), "")
        lines.append(f"- {kind} at width {width} ({pick.share:.0%} of the weight bytes per token, "
                     f"{pick.width_share:.0%} of them at this width){': ' + where if where else ''}: {rates}")
    return lines


def setting_table(part: ModelRoofline) -> list[str]:
    """A Markdown table: per setting the two sides, the roofline, which binds, and each arm's GB/s and share."""
    arms = list(dict.fromkeys(a for s in part.settings for a, _ in s.arms))
    head = ["setting", "in cache GB/s", "stream 4 KiB", "stream huge", "roofline", "binds",
            *(f"{a} GB/s (share)" for a in arms)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in part.settings:
        rates = dict(s.arms)
        cells = [s.label, _gbps(s.in_cache_gbps), _gbps(s.ceilings.page_4k_gbps), _gbps(s.ceilings.huge_gbps),
                 _gbps(s.roofline_gbps), s.binds or "—",
                 *(f"{_gbps(rates.get(a))} ({_pct(s.share(rates.get(a)))})" for a in arms)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(part: ModelRoofline) -> list[str]:
    """One line per setting, for a terminal or run's report.md."""
    if not part.available:
        return [f"roofline: {part.note}"]
    out = []
    for s in part.settings:
        arms = ", ".join(f"{a} {_gbps(g)} GB/s ({_pct(s.share(g))})" for a, g in s.arms)
        out.append(f"{s.label}: roofline {_gbps(s.roofline_gbps)} GB/s ({s.binds or 'side unknown'} binds: in cache "
                   f"{_gbps(s.in_cache_gbps)}, stream {_gbps(s.ceilings.page_4k_gbps)} on 4 KiB / "
                   f"{_gbps(s.ceilings.huge_gbps)} on huge pages)" + (f"; {arms}" if arms else ""))
    return out

