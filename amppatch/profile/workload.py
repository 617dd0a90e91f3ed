"""The workload run of `amppatch profile`: options, the program's argv and environment, and the three
backends — the LD_PRELOAD sampler (always), `perf` and `cachegrind` (counters / simulation, run once plain
beside the traced run, because they do not mix with the tracer's timers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch import proc
from amppatch.childpages import ChildPages
from amppatch.errors import SubprocessError, ToolMissingError, UsageError
from amppatch.inputs import check_gguf
from amppatch.profile.derive import HOT_FUNCTIONS
from amppatch.weightpages import WeightPages

if TYPE_CHECKING:
    from amppatch.build import Build

BACKENDS = ("sampler", "perf", "cachegrind")


@dataclass(frozen=True)
class ProfileOptions:
    repo: Path | None = None  # llama.cpp tree (for source analysis and building); None: sites skipped
    model: Path | None = None
    build: Path | None = None  # a build dir or manifest; None: the default native build of `repo`
    threads: int = 1
    tokens: int = 64
    repack: int | None = None  # llama-bench --repack 0|1 (None: its default)
    hz: int = 1000
    backend: str = "sampler"
    out: Path | None = None
    command: tuple[str, ...] = ()  # a workload to run instead of llama-bench
    timeout: float = 3600.0
    # the roofline of the model's weight kernels after the workload; the command turns it on, callers that
    # profile on the way to something else (run's profile stage, the bench) leave it off
    roofline: bool = False

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("repo", "model", "build", "out"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["command"] = list(self.command)
        return data


def resolve_options(options: ProfileOptions) -> ProfileOptions:
    """Check and complete options in one place (paths resolved, defaults filled)."""
    if options.backend not in BACKENDS:
        raise UsageError(f"unknown backend {options.backend!r}", next_step=f"use one of {', '.join(BACKENDS)}")
    if options.threads < 1 or options.tokens < 1:
        raise UsageError("--threads and --tokens must be at least 1")
    if options.hz < 0 or options.hz > 10000:
        raise UsageError("--hz must be between 0 and 10000")
    model = Path(options.model).expanduser().resolve() if options.model else None
    if not options.command:
        if model is None:
            raise UsageError("profile needs --model (or a command after --)", next_step="e.g. amppatch model synth")
        check_gguf(model)  # before the build and the workload: a cut file fails here in milliseconds
        if options.repo is None and options.build is None:
            raise UsageError("profile needs --repo or --build to find llama-bench", next_step="pass --repo DIR")
    repo = Path(options.repo).expanduser().resolve() if options.repo else None
    if repo is not None:
        from amppatch.workspace import check_llama_tree

        repo = check_llama_tree(repo)
    out = Path(options.out).expanduser().resolve() if options.out else Path.cwd() / "profile.json"
    build = Path(options.build).expanduser().resolve() if options.build else None
    return ProfileOptions(
        repo=repo, model=model, build=build, threads=options.threads, tokens=options.tokens, repack=options.repack,
        hz=options.hz, backend=options.backend, out=out, command=tuple(options.command), timeout=options.timeout,
        roofline=options.roofline,
    )


def _load_or_build(options: ProfileOptions) -> Build | None:
    from amppatch.build import BuildOptions, build, load_build

    if options.build is not None:
        return load_build(options.build)
    if options.repo is not None and not options.command:
        return build(BuildOptions(repo=options.repo))
    return None


def workload_argv(options: ProfileOptions, bench: Path | None) -> list[str]:
    if options.command:
        return list(options.command)
    assert bench is not None and options.model is not None
    argv = [str(bench), "-m", str(options.model), "-p", "0", "-n", str(options.tokens), "-t", str(options.threads),
            "-r", "1", "-o", "jsonl"]
    if options.repack is not None:
        argv += ["--repack", str(options.repack)]
    return argv


def elf_linkage(path: Path) -> str:
    """'dynamic', 'static' (no interpreter: LD_PRELOAD cannot load the tracer) or 'not-elf'."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            has_interp = any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
            return "dynamic" if has_interp else "static"
    except (OSError, ELFError):
        return "not-elf"


def _which(argv0: str) -> Path | None:
    import shutil

    found = shutil.which(argv0)
    return Path(found).resolve() if found else None


def _bench_jsonl(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows



def _check_backend(backend: str) -> str:
    """Why a counter/simulator backend cannot run here, or '' when it can."""
    if backend == "perf":
        import shutil

        if shutil.which("perf") is None:
            return "`perf` is not installed"
        done = proc.run(["perf", "stat", "-x,", "-e", "cache-misses", "true"], check=False, what="perf stat")
        return perf_counters_missing(done.stdout + done.stderr, done.returncode)
    if backend == "cachegrind":
        import shutil

        if shutil.which("valgrind") is None:
            return "`valgrind` is not installed"
    return ""


def _run_perf(argv: list[str], env: dict[str, str], workdir: Path, timeout: float) -> dict:
    data = workdir / "perf.data"
    proc.run(["perf", "record", "-e", "cache-misses", "-o", str(data), "--", *argv], env=env, timeout=timeout,
             what="perf record")
    rep = proc.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "symbol", "--percent-limit", "0.5"],
                   timeout=600, what="perf report")
    return {"event": "cache-misses", "functions": parse_perf_report(rep.stdout)}


def perf_counters_missing(perf_stat_output: str, returncode: int) -> str:
    """Why `perf stat -x, -e cache-misses true` shows no hardware counters, or '' when it counted (pure)."""
    text = perf_stat_output.strip()
    if returncode != 0 or "not supported" in text.lower() or "not counted" in text.lower():
        return "this machine exposes no hardware performance counters (`perf stat -e cache-misses` says: " + (
            text.splitlines()[0] if text else f"exit {returncode}") + ")"
    return ""


def parse_perf_report(text: str) -> list[dict]:
    """Per-symbol cache-miss shares from `perf report --stdio --sort symbol` (pure)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[\.\]\s+(.+)$", line)
        if m:
            rows.append({"function": m.group(2).strip(), "cache_miss_share": float(m.group(1)) / 100})
    return rows


def parse_cg_annotate(text: str) -> list[dict]:
    """Per-function event counts (Ir, D1mr, DLmr, ...) from `cg_annotate` output, old and new styles (pure)."""
    header: list[str] = []
    rows: list[dict] = []
    for line in text.splitlines():
        if line.strip().startswith("Ir") and "file:function" in line:
            header = line.split()[:-1]
            continue
        if not header:
            continue
        if line.startswith("-- ") and rows:
            break  # the per-function table is over (auto-annotated sources follow)
        parts = re.sub(r"\(\s*[\d.]+%\)", " ", line).split()  # newer versions add "(12.3%)" after each count
        if len(parts) <= len(header) or not all(re.fullmatch(r"[\d,]+|\.", p) for p in parts[: len(header)]):
            continue
        counts = [int(p.replace(",", "")) if p != "." else 0 for p in parts[: len(header)]]
        rows.append({"function": " ".join(parts[len(header) :]), **dict(zip(header, counts, strict=True))})
    return rows


def _run_cachegrind(argv: list[str], env: dict[str, str], workdir: Path, timeout: float) -> dict:
    out = workdir / "cachegrind.out"
    done = proc.run(["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--cachegrind-out-file={out}", "--", *argv],
                    env=env, timeout=timeout, check=False, what="valgrind --tool=cachegrind")
    if done.returncode != 0 or not out.exists():
        tail = done.stderr[-2000:]
        why = ""
        if "unhandled instruction" in tail or "SIGILL" in tail:
            why = " (valgrind cannot execute this build's instructions, e.g. AVX-512: profile a build with " \
                  "GGML_NATIVE=OFF / AVX2, or a smaller program)"
        raise SubprocessError(f"cachegrind run failed: {proc.describe_returncode(done.returncode)}{why}",
                              returncode=done.returncode, output_tail=tail)
    ann = proc.run(["cg_annotate", str(out)], timeout=600, what="cg_annotate")
    rows = parse_cg_annotate(ann.stdout)
    key = "DLmr" if rows and "DLmr" in rows[0] else None
    if key:
        rows.sort(key=lambda r: -r[key])
    return {"simulated": True, "functions": rows[:HOT_FUNCTIONS], "ll_read_miss_column": key}


def _raise_if_crashed(returncode: int, out: Path, crash_signal: int = 0) -> None:
    if returncode == 0:
        return
    extra = f" (the tracer recorded signal {crash_signal})" if crash_signal else ""
    raise SubprocessError(
        f"the profiled program failed: {proc.describe_returncode(returncode)}{extra}",
        next_step=f"what was recorded up to the failure is in {out}",
        returncode=returncode,
    )



@dataclass
class Workload:
    """The program that ran under the tracer, how it ended, and what a counter/simulator backend saw."""

    build: Build | None
    argv: list[str]
    linkage: str  # 'dynamic', 'static' or 'not-elf' (elf_linkage)
    trace_path: Path
    done: proc.Completed
    record: dict  # profile.json's "workload" entry
    extra: dict  # {"perf": ...} or {"cachegrind": ...}: the plain run under the counter/simulator backend
    pages: WeightPages | None = None  # the model file's huge-page share in the traced run (None: no model)


def prepare_workload(options: ProfileOptions) -> tuple[Build | None, list[str], str]:
    """Check the backend, find (or build) the program and say how it is linked — before anything runs."""
    if options.backend != "sampler":
        why = _check_backend(options.backend)
        if why:
            raise ToolMissingError(
                f"backend {options.backend} is unavailable: {why}",
                next_step="use --backend sampler (the default; it needs no counters)",
            )
    build = _load_or_build(options)
    bench = build.binary("llama-bench") if (build is not None and not options.command) else None
    argv = workload_argv(options, bench)
    exe = Path(argv[0]) if "/" in argv[0] else _which(argv[0])
    if exe is None or not exe.exists():
        raise UsageError(f"cannot find the program {argv[0]!r}", next_step="give a path or a program on PATH")
    return build, argv, elf_linkage(exe)


def run_workload(options: ProfileOptions, build: Build | None, argv: list[str], linkage: str) -> Workload:
    """Run the program traced (and, for perf/cachegrind, once more plain under that tool); never raises
    for the program's own failure — the caller writes what was recorded first."""
    from amppatch.tracer import tracer_env

    assert options.out is not None
    env = dict(os.environ)
    if build is not None:
        from amppatch.build import run_env

        env.update(run_env(build))
    workdir = trace_dir_for(options.out)
    workdir.mkdir(parents=True, exist_ok=True)
    trace_path = workdir / "trace.bin"
    env.update(tracer_env(trace_path, sample_hz=options.hz, base_env=env))  # keeps the build's own preload

    extra: dict = {}
    proc.progress(f"profile: running {shlex.join(argv)} under the {options.backend} backend")
    t0 = time.monotonic()
    if options.backend != "sampler":
        # counters/simulation do not mix with the tracer's timers: run plain under the tool, then once traced
        plain_env = {k: v for k, v in env.items() if not k.startswith("AMPTRACE_") and k != "LD_PRELOAD"}
        runner = _run_perf if options.backend == "perf" else _run_cachegrind
        extra[options.backend] = runner(argv, plain_env, workdir, options.timeout)
    # the traced run is also watched for where the model's weights sit (its smaps, from this process)
    watch = ChildPages(options.model) if options.model is not None else None
    with watch or contextlib.nullcontext():
        done = proc.run(argv, env=env, timeout=options.timeout, check=False, what=Path(argv[0]).name)
    pages = None
    if watch is not None and options.model is not None:
        pages = WeightPages.watched(watch.result, options.model.stat().st_size, "the profiled run")
    wall = time.monotonic() - t0
    record = {
        "argv": argv, "returncode": done.returncode, "ended": proc.describe_returncode(done.returncode),
        "wall_seconds": round(wall, 3), "linkage": linkage, "bench": _bench_jsonl(done.stdout),
        "stderr_tail": done.stderr[-2000:] if done.returncode != 0 else "",
    }
    return Workload(build, argv, linkage, trace_path, done, record, extra, pages)


def trace_dir_for(out: Path) -> Path:
    """Where the tracer writes the workload's trace: beside profile.json, named after it."""
    return out.parent / (out.stem + ".trace")
