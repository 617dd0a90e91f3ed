"""amppatch run: the whole job in one command, resumable.

    fetch → build (stock) → model (synthetic, or --model's) → profile → apply --tunable [--hugepages]
          → tune (budgeted) → bake (apply --learned, --hugepages, both) → final race of the levers → report

Every stage records what it produced in ``<out>/run-state.json`` together with a key (a hash of the options
it depends on and of what the stages before it produced). A rerun with the same output directory reuses a
stage whose key matches and whose outputs still exist, so an interrupted or failed run continues where it
stopped; changing an option (say ``--shape``) redoes that stage and everything after it. A failed stage is
recorded as failed and the error names it and says how to resume.

Two levers race (`run_race.py`): prefetch (tune's winners) and huge pages (`pages.py`), the latter only where
THP is not `never` — then the tunable build carries it too, so tune searches with the pages that would ship.
Bake makes one build per lever and one with both; the final ab-test races them against stock and the keep
rule decides what ships. With no lever to race (tune kept no site and THP is `never`) the bake and final
stages are recorded as skipped and the report says that stock stays the answer.

``--quick`` is the smoke-test configuration: the tiny model, one thread, a one-minute tune with short probes
and a three-round final ab-test at small long-context and prompt sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.inputs import creating_dir
from amppatch.paths import FileLock, options_json, write_text_atomic
from amppatch.proc import progress
from amppatch.report import require_measured
from amppatch.run_report import render_summary
from amppatch.runstate import SCHEMA_VERSION, STAGES, RunStateDoc, StageRecord, outputs_exist
from amppatch.tune.shares import DEFAULT_MIN_SHARE

if TYPE_CHECKING:
    from amppatch.build import BuildOptions

STATE_FILE = "run-state.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class RunOptions:
    repo: Path | None = None  # None: the pinned tree (`amppatch llama fetch`)
    out: Path | None = None
    shape: str = "1b"
    type: str = "q8_0"
    threads: tuple[int, ...] | None = None  # first: tuning count; others: verified; None = (1, CPU count)
    budget_minutes: float = 20.0
    final_minutes: float = 10.0
    profile_tokens: int = 32
    repack: int | None = None  # llama-bench --repack for profile, tune and the final ab-test
    build_options: BuildOptions | None = None  # every build's template; repo is filled in (None: defaults)
    quick: bool = False
    lock: Path | None = None
    seed: int = 0
    model: Path | None = None  # the user's GGUF in place of the synthetic model (shape and type unused)
    min_share: float = DEFAULT_MIN_SHARE  # tune --min-share: kernels with a smaller sample share are not tuned
    long_depth: int | None = None  # final race: tg at this depth at the first thread count (0: none; None: default)
    prompt_tokens: int | None = None  # final race: pp of this many tokens at the first thread count (0: none)
    thp_enabled: str | None = None  # this machine's THP mode, read when resolved; "never": no huge-page lever

    def to_json(self) -> dict[str, Any]:
        return options_json(self)

    @property
    def hugepages(self) -> bool:
        """Whether the huge-page lever races: not where THP is `never` or absent (it would map small pages)."""
        from amppatch.run_race import NO_THP

        return self.thp_enabled not in NO_THP


LONG_DEPTH, QUICK_LONG_DEPTH = 1024, 128
PROMPT_TOKENS, QUICK_PROMPT_TOKENS = 256, 64
# Tokens a timed sample generates, from the profile's p50 token time: a sample of about PROBE_SECONDS
# (tune) or RACE_SECONDS (the final race) keeps timer and scheduling jitter small against it, while an 8B
# model (~0.3 s a token at 1 thread) does not spend most of a minute on every llama-bench call. Models of
# the 1B class, under 60 ms a token, keep the upper bounds.
PROBE_SECONDS, PROBE_TOKENS = 2.0, (8, 32)
RACE_SECONDS, RACE_TOKENS = 4.0, (16, 64)


def sample_tokens(token_ms: float | None, seconds: float, bounds: tuple[int, int]) -> int:
    """Tokens for a sample of about `seconds` at `token_ms` a token, within `bounds`; the upper bound when the
    token time is unknown (a profile from before it was recorded)."""
    low, high = bounds
    if token_ms is None or token_ms <= 0:
        return high
    return max(low, min(high, math.ceil(seconds * 1000.0 / token_ms)))


def resolve_options(options: RunOptions) -> RunOptions:
    from amppatch.model import SHAPES, TYPES

    shape, threads, budget, final = options.shape, options.threads, options.budget_minutes, options.final_minutes
    if options.quick:
        shape = "tiny" if options.shape == "1b" else options.shape
        threads = threads or (1,)
        budget = min(budget, 1.0)
        final = min(final, 1.0)
    if shape not in SHAPES:
        raise UsageError(f"unknown --shape {shape!r}", next_step=f"use one of {', '.join(SHAPES)}")
    if options.type not in TYPES:
        raise UsageError(f"unknown --type {options.type!r}", next_step=f"use one of {', '.join(TYPES)}")
    if threads is None:
        ncpu = os.cpu_count() or 1
        threads = tuple(dict.fromkeys((1, ncpu)))
    if not threads or any(t < 1 for t in threads):
        raise UsageError("--threads must list positive thread counts", next_step="e.g. --threads 1,2")
    if not (0 < budget < math.inf and 0 < final < math.inf):  # nan and inf too: they never run out
        raise UsageError("--budget and --final-minutes must be positive", next_step="e.g. --budget 20")
    if options.profile_tokens < 1:  # else found by the profile stage, after fetch, build and model
        raise UsageError("--profile-tokens must be at least 1", next_step="e.g. --profile-tokens 32")
    if not 0 <= options.min_share < 1:  # nan too; else found by the tune stage, after the builds
        raise UsageError(f"--min-share must be a fraction in [0, 1), not {options.min_share}",
                         next_step="e.g. --min-share 0.05 (0 tunes every site)")
    long_depth = options.long_depth
    if long_depth is None:
        long_depth = QUICK_LONG_DEPTH if options.quick else LONG_DEPTH
    prompt_tokens = options.prompt_tokens
    if prompt_tokens is None:
        prompt_tokens = QUICK_PROMPT_TOKENS if options.quick else PROMPT_TOKENS
    if long_depth < 0 or prompt_tokens < 0:
        raise UsageError("--long-depth and --prompt-tokens must not be negative (0 leaves that setting out)",
                         next_step="e.g. --long-depth 1024 --prompt-tokens 256")
    from amppatch.pages import thp_enabled_mode

    thp = options.thp_enabled or thp_enabled_mode()
    lock = options.lock
    if lock is None and os.environ.get("AMPPATCH_MEASURE_LOCK"):
        lock = Path(os.environ["AMPPATCH_MEASURE_LOCK"])
    out = Path(options.out or Path.cwd() / "amppatch-run").expanduser().resolve()
    if options.repo:  # checked here, before the run directory and its state exist
        from amppatch.workspace import check_llama_tree

        check_llama_tree(options.repo)
        from amppatch.build import dirty_files

        dirty = dirty_files(Path(options.repo).expanduser())
        if dirty:  # the apply stage refuses it too — but only after the build, the model and the profile
            shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            raise UsageError(f"{options.repo} has uncommitted changes: {shown}",
                             next_step="commit or stash them first: run's apply stage commits on its own branch "
                                       "from a clean tree")
    repo = Path(options.repo).expanduser().resolve() if options.repo else None
    model = options.model
    if model is not None:  # checked, read and described before any build; refused here when it cannot run
        from amppatch.run_model import check_user_model

        model = check_user_model(model).path
    return replace(options, repo=repo, model=model, out=out, shape=shape, threads=tuple(threads), budget_minutes=budget,
                   final_minutes=final, lock=lock, long_depth=long_depth, prompt_tokens=prompt_tokens, thp_enabled=thp)


# ----------------------------------------------------------------------------------------------------------
# State


def stage_key(name: str, inputs: Any) -> str:
    return hashlib.sha256(json.dumps([name, inputs], sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """run-state.json of the run directory: the typed document (`doc`) and how a stage is reused or recorded."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        # A record this amppatch cannot read is refused, not overwritten: it may be another version's run.
        self.doc = RunStateDoc.read(path) if path.is_file() else RunStateDoc(path=path)
        self.doc.path = path
        self.doc.set_options(options)

    @property
    def path(self) -> Path:
        assert self.doc.path is not None
        return self.doc.path

    @property
    def stages(self) -> dict[str, StageRecord]:
        return self.doc.stages

    def reusable(self, name: str, key: str) -> StageRecord | None:
        rec = self.doc.stages.get(name)
        if rec and rec.status in ("done", "skipped") and rec.key == key and outputs_exist(rec.outputs):
            return rec
        return None

    def record(self, name: str, key: str, status: str, outputs: dict[str, Any], seconds: float,
               error: str | None = None) -> StageRecord:
        rec = StageRecord(status, key, outputs, round(seconds, 1),
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), error)
        self.doc.stages[name] = rec
        self.save()
        return rec

    def save(self) -> None:
        write_text_atomic(self.path, self.doc.dumps())


# ----------------------------------------------------------------------------------------------------------
# Stages


class _Runner:
    def __init__(self, options: RunOptions) -> None:
        assert options.out is not None and options.threads is not None
        self.o = options
        self.out: Path = options.out
        self.state = RunState(self.out / STATE_FILE, options.to_json())
        self.outputs: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, inputs: Any, fn: Callable[[], tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Reuse or run one stage; `fn` returns (status, outputs)."""
        n = STAGES.index(name) + 1
        # The key covers the finished records of the stages this one builds on (their outputs and times).
        done = self.state.stages
        upstream = {s: done[s].finished_utc if s in done else None for s in STAGES[: n - 1]}
        key = stage_key(name, [inputs, upstream])
        rec = self.state.reusable(name, key)
        if rec is not None:
            progress(f"run: [{n}/{len(STAGES)}] {name}: reused ({rec.status} {rec.finished_utc})")
            self.outputs[name] = rec.outputs
            return rec.outputs
        progress(f"run: [{n}/{len(STAGES)}] {name} ...")
        t0 = time.monotonic()
        try:
            status, outputs = fn()
        except AmppatchError as exc:
            self.state.record(name, key, "failed", {}, time.monotonic() - t0, str(exc))
            resume = (f"fix the cause, then rerun the same `amppatch run` command with -o {self.out} to resume: "
                      f"finished stages ({', '.join(STAGES[: n - 1]) or 'none'}) are reused")
            exc.message = f"run: stage '{name}' failed: {exc.message}"
            exc.next_step = f"{exc.next_step}; then {resume}" if exc.next_step else resume
            raise
        except KeyboardInterrupt:
            self.state.record(name, key, "failed", {}, time.monotonic() - t0, "interrupted")
            raise
        self.state.record(name, key, status, outputs, time.monotonic() - t0)
        self.outputs[name] = outputs
        progress(f"run: [{n}/{len(STAGES)}] {name}: {status} ({time.monotonic() - t0:.0f} s)")
        return outputs

    # -- the stages ----------------------------------------------------------------------------------------

    def fetch(self) -> tuple[str, dict[str, Any]]:
        from amppatch.workspace import FetchOptions, check_llama_tree, fetch_llama

        repo = check_llama_tree(self.o.repo) if self.o.repo else fetch_llama(FetchOptions())
        return "done", {"repo": str(repo), "paths": [str(repo)]}

    def build_options(self) -> BuildOptions:
        from amppatch.build import BuildOptions

        repo = Path(self.outputs["fetch"]["repo"])
        template = self.o.build_options or BuildOptions(repo=repo)
        return replace(template, repo=repo, ref=None, name="stock")

    def build(self) -> tuple[str, dict[str, Any]]:
        from amppatch.build import build

        b = build(self.build_options())
        return "done", {"build": str(b.dir), "paths": [str(b.dir / "manifest.json")]}

    def model(self) -> tuple[str, dict[str, Any]]:
        from amppatch.build import load_build
        from amppatch.gate_sites import DENSE_SHAPE, EXPERT_SHAPE
        from amppatch.model import SHAPES, SynthOptions, synth_model

        b = load_build(Path(self.outputs["build"]["build"]))
        if self.o.model is not None:
            return "done", self.user_model(b)
        model = synth_model(SynthOptions(shape=self.o.shape, type=self.o.type, seed=self.o.seed, build=b))
        # The correctness gates (apply's, the final ab-test's) run on the tiny model of the same weight type
        # and layout (experts run mul_mat_id): the same kernels, seconds instead of minutes.
        shape = EXPERT_SHAPE if SHAPES[self.o.shape].experts else DENSE_SHAPE
        gate = synth_model(SynthOptions(shape=shape, type=self.o.type, seed=self.o.seed, build=b))
        return "done", {"model": str(model), "gate_model": str(gate), "paths": [str(model), str(gate)]}

    def user_model(self, build: object) -> dict[str, Any]:
        """--model: nothing synthesized for the main model. apply gates each patched kernel on a tiny model of
        its own weight type (sites of none on the dominant type's); the final ab-test gates on the tiny model
        of the dominant type (MoE: the tiny MoE model), if it has one."""
        from amppatch.gate_sites import DENSE_SHAPE, EXPERT_SHAPE
        from amppatch.gguf_info import read_gguf
        from amppatch.model import SynthOptions, synth_model
        from amppatch.run_model import dominant_type, gate_type, summary

        assert self.o.model is not None
        info = read_gguf(self.o.model)
        t = gate_type(info)
        shape = EXPERT_SHAPE if info.n_expert else DENSE_SHAPE
        gate = synth_model(SynthOptions(shape=shape, type=t, seed=self.o.seed, build=build)) if t else None
        note = None if t else (f"the dominant weight type {dominant_type(info)} has no synthetic model: the final "
                               "ab-test skips its correctness gate (apply gated every patched kernel on its type)")
        return {"model": str(info.path), "user_model": summary(info), "gate_model": str(gate) if gate else None,
                "gate_type": t, "gate_note": note, "paths": [str(info.path)] + ([str(gate)] if gate else [])}

    def apply_gate(self) -> dict[str, Any]:
        """apply's gate options. With --model, no model: apply gates each patched kernel on a tiny synthetic
        model of its own weight type, and sites of none (flash attention) on the dominant type's."""
        if self.o.model is not None:
            return {"gate_model": None, "gate_type": self.outputs["model"].get("gate_type")}
        return {"gate_model": Path(self.outputs["model"]["gate_model"])}

    def profile(self) -> tuple[str, dict[str, Any]]:
        from amppatch.profile import WEIGHT_KERNEL_RE, ProfileOptions, profile, site_function_name
        from amppatch.profile.derive import ops_label

        o = self.o
        assert o.threads is not None
        result = profile(ProfileOptions(repo=Path(self.outputs["fetch"]["repo"]), model=Path(self.outputs["model"]
                                        ["model"]), build=Path(self.outputs["build"]["build"]), threads=o.threads[0],
                                        tokens=o.profile_tokens, repack=o.repack, out=self.out / "profile.json"))
        progress(result.summary)
        hot = result.profile.hot_functions
        sites = result.profile.sites
        fallback: list[str] = []
        if not sites:
            # No streaming loop was mapped: the hottest weight kernel, with apply's default loop and stream.
            kernels = [site_function_name(h["name"]) for h in hot if WEIGHT_KERNEL_RE.search(h.get("name", ""))]
            if not kernels:
                raise AmppatchError(
                    "the profile found no site and no weight kernel among the hot functions "
                    f"({', '.join(h.get('name', '?') for h in hot[:3]) or 'none'})",
                    next_step="check profile.json; a model whose weights run a CPU kernel is needed")
            fallback = [kernels[0]]
            progress(f"run: the profile mapped no loop; falling back to the hottest kernel {kernels[0]}")
        return "done", {"profile": str(result.path), "paths": [str(result.path)],
                        "hot_function": hot[0]["name"] if hot else None,
                        "hot_share": hot[0].get("share") if hot else None,
                        "sites": [f"{s.function}:{s.loop}:{s.stream}" for s in sites],
                        "fallback_sites": fallback,
                        # sizes tune's and the final race's samples (sample_tokens)
                        "token_p50_ms": (result.profile.get("tokens") or {}).get("p50_ms"),
                        # a mixture of experts: the products that drive each hot kernel, by its weight type
                        "matrix_ops": {h["name"]: ops_label(h) for h in hot if h.get("ops")}}

    def apply_tunable(self) -> tuple[str, dict[str, Any]]:
        from amppatch.patch import ApplyOptions, apply

        prof = self.outputs["profile"]
        use_profile = not prof["fallback_sites"]
        result = apply(ApplyOptions(
            repo=Path(self.outputs["fetch"]["repo"]),
            profile=Path(prof["profile"]) if use_profile else None,
            sites=() if use_profile else tuple(prof["fallback_sites"]),
            tunable=True, hugepages=self.o.hugepages, build_options=self.build_options(), out=self.out / "tunable",
            **self.apply_gate()))
        manifest = result.manifest
        if manifest is None:
            raise AmppatchError("apply --tunable changed nothing", next_step="see the apply messages above")
        return "done", {"manifest": str(manifest.path), "branch": manifest.branch,
                        "tunable_build": manifest.build_b, "paths": [str(manifest.path)]}

    def token_ms(self) -> float | None:
        """The profile's p50 token time (None from a profile stage recorded before it was kept)."""
        return (self.outputs.get("profile") or {}).get("token_p50_ms")

    def bench_args(self) -> tuple[str, ...]:
        return ("--repack", str(self.o.repack)) if self.o.repack is not None else ()

    def tune(self) -> tuple[str, dict[str, Any]]:
        from amppatch.tune import TuneOptions, tune

        o = self.o
        assert o.threads is not None
        search: dict[str, Any] = dict(probe_tokens=16, probe_rounds=2, confirm_rounds=3, refine_levels=1,
                                      max_batch=6, grid_min=1024, grid_max=8192) if o.quick else \
            {"probe_tokens": sample_tokens(self.token_ms(), PROBE_SECONDS, PROBE_TOKENS)}
        # the profile gives the kernel shares: the budget split and --min-share
        result = tune(TuneOptions(
            repo=Path(self.outputs["fetch"]["repo"]), model=Path(self.outputs["model"]["model"]),
            tunable_manifest=Path(self.outputs["apply"]["manifest"]), profile=Path(self.outputs["profile"]["profile"]),
            threads=o.threads[0], verify_threads=tuple(o.threads[1:]), budget_minutes=o.budget_minutes,
            out=self.out / "tune", bench_args=self.bench_args(), lock=o.lock, seed=o.seed, min_share=o.min_share,
            resume=True, **search))
        learned = result.learned
        winners = learned.winners
        b = learned.budget
        # report.md's Tune section is rendered from these (render_summary reads no file)
        return "done", {"learned": str(result.path), "paths": [str(result.path)], "kept": len(winners),
                        "dropped": len(learned.dropped),
                        "winners": [f"{w.key} d={w.distance_bytes} h={w.hint}" for w in winners],
                        "kernels": learned.kernel_rows(), "joint": learned.joint,
                        "probe_tokens": search["probe_tokens"],
                        "budget": {k: b.get(k) for k in ("minutes", "spent_minutes", "stopped_because", "split",
                                                         "min_share")} | {"probes": len(learned.probes)}}

    def bake(self) -> tuple[str, dict[str, Any]]:
        """One build per lever that races, and one with both (`run_race.race_arms`), each from its own apply."""
        from amppatch.build import load_build
        from amppatch.patch import ApplyOptions, apply
        from amppatch.run_race import baked_record, race_arms

        arms = race_arms(bool(self.outputs["tune"]["kept"]), self.o.hugepages)
        if len(arms) < 2:
            return "skipped", {"reason": "tune kept no site (nothing beat 'off' beyond the noise) and the huge-page "
                                         f"lever cannot work here (THP {self.o.thp_enabled}): no lever to race",
                               "paths": []}
        baked: dict[str, dict[str, Any]] = {}
        for arm in arms[1:]:
            result = apply(ApplyOptions(
                repo=Path(self.outputs["fetch"]["repo"]),
                learned=(Path(self.outputs["tune"]["learned"]),) if arm in ("prefetch", "both") else (),
                hugepages=arm in ("pages", "both"), build_options=self.build_options(), out=self.out / arm,
                **self.apply_gate()))
            manifest = result.manifest
            if manifest is None or not manifest.builds:
                raise AmppatchError(f"apply for the {arm} arm produced no build",
                                    next_step="see the apply messages above")
            baked[arm] = baked_record(manifest, result.patch_path, load_build(Path(manifest.builds["b"])).manifest)
        return "done", {"arms": baked, "stock_build": baked[arms[1]]["stock_build"],
                        "paths": [b["manifest"] for b in baked.values()]}

    def final(self) -> tuple[str, dict[str, Any]]:
        """The race of stock and every baked arm, at every setting; the keep rule decides what ships."""
        from amppatch.abtest import run_abtest
        from amppatch.run_race import race_options, race_outputs

        o = self.o
        assert o.threads is not None and o.long_depth is not None and o.prompt_tokens is not None
        bake = self.outputs["bake"]
        if not bake.get("arms"):
            return "skipped", {"reason": bake.get("reason", "no lever baked"), "paths": []}
        gate = self.outputs["model"].get("gate_model")
        options = race_options(
            bake["stock_build"], {arm: b["build"] for arm, b in bake["arms"].items()}, self.bench_args(),
            model=Path(self.outputs["model"]["model"]), gate_model=Path(gate) if gate else None,
            threads=tuple(o.threads), long_depth=o.long_depth, prompt_tokens=o.prompt_tokens, quick=o.quick,
            final_minutes=o.final_minutes, seed=o.seed, out=self.out / "final",
            tokens=sample_tokens(self.token_ms(), RACE_SECONDS, RACE_TOKENS))
        if o.lock is not None:
            progress(f"run: waiting for the measurement lock {o.lock} ...")
            with FileLock(o.lock):
                report = run_abtest(options)
        else:
            report = run_abtest(options)
        return "done", race_outputs(report, options)

    def report(self) -> tuple[str, dict[str, Any]]:
        path = self.out / REPORT_FILE
        write_text_atomic(path, render_summary(self.o, self.outputs, self.state.stages))
        stages = {name: rec.to_json() for name, rec in self.state.stages.items()}
        summary = {"schema_version": SCHEMA_VERSION, "options": self.o.to_json(), "stages": stages,
                   "outputs": self.outputs}
        write_text_atomic(self.out / "run.json", json.dumps(summary, indent=1, default=str) + "\n")
        return "done", {"report": str(path), "paths": [str(path)]}


def run(options: RunOptions) -> Path:
    """Run (or resume) the whole pipeline; returns the run's report.md."""
    options = resolve_options(options)
    assert options.out is not None and options.threads is not None
    with creating_dir(options.out):  # a run refused before its first stage leaves no empty directory
        return _run(options)


def model_stage_inputs(options: RunOptions) -> Any:
    """What the model stage's key covers; --model's file by its identity, so a touched or replaced model is
    redone (and every stage after it)."""
    if options.model is not None:
        from amppatch.run_model import model_identity

        return ["user", model_identity(options.model), options.seed]
    return [options.shape, options.type, options.seed]


def _run(options: RunOptions) -> Path:
    assert options.out is not None and options.threads is not None
    r = _Runner(options)
    bo = r.o.build_options
    build_inputs = json.loads(json.dumps(asdict(replace(bo, repo=Path("."))), default=str)) if bo else None
    r.stage("fetch", {"repo": str(options.repo) if options.repo else None}, r.fetch)
    r.stage("build", build_inputs, r.build)
    r.stage("model", model_stage_inputs(options), r.model)
    r.stage("profile", [options.threads[0], options.profile_tokens, options.repack], r.profile)
    r.stage("apply", [options.hugepages], r.apply_tunable)
    r.stage("tune", [options.threads, options.budget_minutes, options.quick, options.repack, options.min_share],
            r.tune)
    r.stage("bake", [options.hugepages], r.bake)
    r.stage("final", [options.threads, options.final_minutes, options.quick, options.long_depth,
                      options.prompt_tokens], r.final)
    # The report is always rewritten (cheap), so it reflects the current state.
    r.state.stages.pop("report", None)
    out = r.stage("report", [], r.report)
    final = r.outputs.get("final") or {}
    if final.get("failures"):
        require_measured({"diagnostics": {"failures": final["failures"]}}, Path(final["report"]),
                         "the final ab-test")
    return Path(out["report"])
