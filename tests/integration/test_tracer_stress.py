"""The tracer under stress: threads created and joined in a loop, fork + exec + posix_spawn, a crash by
signal, token/region hooks — with the plain tracer and with an ASan+UBSan build of it. Nothing may hang
(every run has a timeout), every trace must be readable, the program's output must not change, and the
crash must still be reported with its signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from amppatch import proc
from amppatch.tracer import read_trace, trace_files, tracer_env

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TIMEOUT = 120


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tracer_fixtures")
    stress = out / "tracer_stress"
    fake = out / "libtracer_fakellama.so"
    proc.run(["cc", "-O1", "-g", "-o", stress, FIXTURES / "tracer_stress.c", "-lpthread", "-ldl"])
    proc.run(["cc", "-O1", "-g", "-fPIC", "-shared", "-o", fake, FIXTURES / "tracer_fakellama.c"])
    return {"stress": stress, "fake": fake}


def _run(programs: dict[str, Path], args: list[str], out: Path | None, *, sanitize: bool = False,
         extra: dict[str, str] | None = None) -> proc.Completed:
    env = dict(os.environ, TRACER_FAKELLAMA=str(programs["fake"]))
    if out is not None:
        env.update(tracer_env(out, sample_hz=1000, sanitize=sanitize))
    env.update(extra or {})
    return proc.run([programs["stress"], *args], env=env, timeout=TIMEOUT, check=False)


SANITIZE = [pytest.param(False, id="plain"), pytest.param(True, id="asan+ubsan")]


@pytest.mark.parametrize("sanitize", SANITIZE)
def test_threads_in_a_loop(programs: dict[str, Path], tmp_path: Path, sanitize: bool) -> None:
    plain = _run(programs, ["threads", "60"], None)
    traced = _run(programs, ["threads", "60"], tmp_path / "t.bin", sanitize=sanitize)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout  # the tracer never changes what the program computes
    assert "runtime error" not in traced.stderr and "AddressSanitizer" not in traced.stderr
    t = read_trace(tmp_path / "t.bin")
    assert t.complete and t.meta["reason"] == "exit"
    assert len(t.threads) == 1 + 60 * 4  # the main thread and every worker got a slot
    assert sum(th.state == "exited" for th in t.threads) == 240
    assert t.calls()["pthread_create"] == 240
    assert t.n_samples > 0 and int(t.meta["untraced_threads"]) == 0


@pytest.mark.parametrize("sanitize", SANITIZE)
def test_fork_exec_and_spawn_children_get_their_own_files(programs: dict[str, Path], tmp_path: Path,
                                                          sanitize: bool) -> None:
    plain = _run(programs, ["fork"], None)
    out = tmp_path / "t.bin"
    traced = _run(programs, ["fork"], out, sanitize=sanitize)
    assert traced.returncode == 0, traced.stderr
    assert sorted(traced.stdout.splitlines()) == sorted(plain.stdout.splitlines())
    files = trace_files(out)
    assert files[0] == out
    children = [read_trace(f) for f in files[1:]]
    root = read_trace(out)
    assert root.complete and root.meta["exe"] == str(programs["stress"])
    # a forked child (_exit), an exec'd child and a posix_spawn'd child: three files named by their pids
    assert len(children) == 3
    assert all(c.complete for c in children)
    assert {c.pid for c in children} == {int(f.name.rsplit(".", 1)[1]) for f in files[1:]}
    assert sorted(c.meta["reason"] for c in children) == ["_exit", "exit", "exit"]
    assert all(c.meta["cmdline"].split("\x1f")[1] == "child" for c in children if c.meta["reason"] == "exit")


def test_children_can_be_left_untraced(programs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "t.bin"
    traced = _run(programs, ["fork"], out, extra={"AMPTRACE_CHILDREN": "0"})
    assert traced.returncode == 0, traced.stderr
    assert trace_files(out) == [out]


@pytest.mark.parametrize("sanitize", SANITIZE)
def test_crash_is_reported_with_its_signal(programs: dict[str, Path], tmp_path: Path, sanitize: bool) -> None:
    plain = _run(programs, ["crash"], None)
    assert plain.returncode == -signal.SIGSEGV
    traced = _run(programs, ["crash"], tmp_path / "t.bin", sanitize=sanitize)
    assert traced.returncode == -signal.SIGSEGV  # re-raised: the parent sees the same death
    assert "runtime error" not in traced.stderr
    t = read_trace(tmp_path / "t.bin")
    assert t.complete and t.meta["reason"] == "signal" and t.crash_signal == signal.SIGSEGV
    assert int(t.meta["crash_pc"]) != 0
    assert not t.modules and t.maps  # written from the handler: /proc/self/maps instead of dl_iterate_phdr
    assert t.n_samples > 0  # the crasher spun long enough to be sampled


@pytest.mark.parametrize("sanitize", SANITIZE)
def test_token_and_region_hooks(programs: dict[str, Path], tmp_path: Path, sanitize: bool) -> None:
    plain = _run(programs, ["llama", "20"], None)
    traced = _run(programs, ["llama", "20"], tmp_path / "t.bin", sanitize=sanitize)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    t = read_trace(tmp_path / "t.bin")
    assert len(t.token_ns) == 21 and all(ns > 0 for ns in t.token_ns)
    assert t.calls()["llama_process"] == 11 and t.calls()["llama_decode"] == 10
    assert t.calls()["llama_synchronize"] == 21
    # the prompt's batch size followed through llama_batch_ext_clear/_add_token; the steps are one token each
    assert [c.n_tokens for c in t.token_calls] == [8] + [1] * 20 and len(t.generation_ns) == 20
    weights = [r for r in t.regions if r.kind == "buffer_usage"]
    assert [(r.name, r.size, r.a) for r in weights] == [("CPU_REPACK", 8 << 20, 1)]
    assert [(r.name, r.size) for r in t.regions if r.kind == "buffer_clear"] == [("CPU", 2 << 20)]
    if not sanitize:  # ASan's allocator replaces posix_memalign outright (it never calls the next one)
        allocs = {r.size for r in t.regions if r.kind == "posix_memalign"}
        assert {8 << 20, 2 << 20} <= allocs
        assert weights[0].addr in {r.addr for r in t.regions if r.kind == "posix_memalign"}


def test_token_hooks_only_mode_has_no_samples(programs: dict[str, Path], tmp_path: Path) -> None:
    env_out = tmp_path / "t.bin"
    env = dict(os.environ, TRACER_FAKELLAMA=str(programs["fake"]), **tracer_env(env_out, sample_hz=0))
    done = proc.run([programs["stress"], "llama", "6"], env=env, timeout=TIMEOUT)
    assert done.returncode == 0
    t = read_trace(env_out)
    assert t.n_samples == 0 and not t.threads and len(t.token_ns) == 7
