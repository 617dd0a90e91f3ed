"""amppatch apply on real compilers, real git and the real llama.cpp tree.

Default tier: the fixture tree (compile database → live #if branches, compiled sizeof probe; git branch,
manifest, idempotency, dirty-tree refusal, dry run) and ONE real-kernel end-to-end run (q8_0: apply →
build A/B with ccache → correctness gate → the kernel provably ran). The other kernels, the build-breaking
patch and the pre-split llama.cpp tree are in the slow tier.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from amppatch.build import BuildOptions
from amppatch.errors import AmppatchError, BuildError, UsageError
from amppatch.patch import ApplyOptions, GitRepo, apply
from amppatch.proc import run
from amppatch.source import analyze_function

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo: Path, *args: str) -> str:
    return run(["git", "-C", str(repo), *args], env={**os.environ, **_IDENTITY}).stdout


@pytest.fixture()
def fixture_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A llama.cpp-shaped git repo holding amppatch's fixtures, with a compile database for them."""
    repo = tmp_path / "repo"
    cpu = repo / "ggml" / "src" / "ggml-cpu"
    cpu.mkdir(parents=True)
    (repo / "include").mkdir()
    (repo / "include" / "llama.h").write_text("/* fixture */\n")
    (repo / "CMakeLists.txt").write_text("# fixture\n")
    for f in FIXTURES.iterdir():
        shutil.copy(f, cpu / f.name)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "fixture base")
    db = tmp_path / "build" / "compile_commands.json"
    db.parent.mkdir()
    # recorded against ANOTHER source root (as a build worktree would be): paths must be rewritten
    other = "/nonexistent/worktree"
    db.write_text(json.dumps([
        {"directory": str(db.parent), "file": f"{other}/ggml/src/ggml-cpu/fx_kernels.c",
         "command": f"gcc -DFX_MID -I{other}/ggml/src/ggml-cpu -O2 -o k.o -c {other}/ggml/src/ggml-cpu/fx_kernels.c"},
        {"directory": str(db.parent), "file": f"{other}/ggml/src/ggml-cpu/fx_vec.cpp",
         "arguments": ["g++", "-DFX_WIDE", "-O2", "-o", "v.o", "-c", f"{other}/ggml/src/ggml-cpu/fx_vec.cpp"]},
    ]))
    return repo, db


def test_live_branches_and_sizes_come_from_the_compiler(fixture_repo: tuple[Path, Path]) -> None:
    repo, db = fixture_repo
    fa = analyze_function(repo, "fx_dot_blocks", db)
    assert [lp.live for lp in fa.loops] == [False, True, False, True, True]  # -DFX_MID
    mid = fa.loops[1].stream("x[ib]")
    assert (mid.element_size, mid.elements_per_iteration_value, mid.bytes_per_iteration) == (42, 2, 84)
    assert fa.default_loop().ordinal == 1
    bumps = analyze_function(repo, "fx_bumps", db)
    assert bumps.loops[0].streams[0].bytes_per_iteration == 188
    assert bumps.loops[1].stream("lo").bytes_per_iteration == 64
    # FX_STEP is 16 under the C++ unit's -DFX_WIDE (8 in the C unit): macro values come from the real command
    half = analyze_function(repo, "fx_vec_dot_half", db)
    assert [lp.live for lp in half.loops] == [False, False, True, True]
    assert half.loops[2].step_value == 16 and half.loops[2].streams[0].bytes_per_iteration == 32
    assert analyze_function(repo, "fx_braceless", db).loops[0].step_value == 8


def test_apply_commits_on_a_branch_and_leaves_the_user_alone(fixture_repo: tuple[Path, Path], tmp_path: Path) -> None:
    repo, db = fixture_repo
    head = _git(repo, "rev-parse", "HEAD").strip()
    before = (repo / "ggml/src/ggml-cpu/fx_kernels.c").read_bytes()
    out = tmp_path / "out"
    opts = ApplyOptions(repo=repo, sites=("fx_dot_blocks", "fx_bumps:1:lo", "fx_dot_blocks:0"), build=False,
                        compile_db=db, out=out, distance=1024, hint=2, line_size=64)
    result = apply(opts)
    assert [s.key for s in result.sites] == ["fx_dot_blocks#1 x[ib]", "fx_bumps#1 lo"]
    assert "dead" in result.skipped[0].reason  # loop 0 is FX_WIDE: not compiled with -DFX_MID
    # the user's branch, index and files are untouched
    assert _git(repo, "rev-parse", "HEAD").strip() == head
    assert _git(repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert _git(repo, "status", "--porcelain") == ""
    assert (repo / "ggml/src/ggml-cpu/fx_kernels.c").read_bytes() == before
    # the branch holds the patch; the message lists every site and parameter
    assert _git(repo, "rev-parse", result.branch).strip() == result.commit
    message = _git(repo, "log", "-1", "--format=%B", result.branch)
    assert "fx_dot_blocks#1 x[ib]" in message and "fx_bumps#1 lo" in message and "distance=1024" in message
    patched = _git(repo, "show", f"{result.branch}:ggml/src/ggml-cpu/fx_kernels.c")
    assert "__builtin_prefetch((const char *)(&x[ib]) + 1024, 0, 2);" in patched
    # 84 B per iteration > one 64 B line: two prefetches per iteration
    assert "+ 1088, 0, 2);" in patched
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["schema_version"] == 1 and manifest["base_commit"] == head and manifest["id"] == result.id
    assert {s["key"] for s in manifest["sites"]} == {"fx_dot_blocks#1 x[ib]", "fx_bumps#1 lo"}
    assert manifest["files"][0]["inserted_lines"]
    patch_text = result.patch_path.read_text()
    assert patch_text.startswith("From ") and "amppatch:" in patch_text
    # the exported patch applies to the base
    check = run(["git", "-C", str(repo), "apply", "--check", str(result.patch_path)], check=False)
    assert check.returncode == 0, check.stderr
    # the same request finds its branch and changes nothing
    again = apply(opts)
    assert again.reused and again.id == result.id and again.commit == result.commit
    assert _git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/amppatch/").count("\n") == 1
    # applying on the patched tree itself: every site already carries its prefetch
    wt = tmp_path / "patched"
    _git(repo, "worktree", "add", "-q", str(wt), result.branch)
    on_patched = apply(ApplyOptions(repo=wt, sites=opts.sites, build=False, compile_db=db, out=out,
                                    distance=1024, hint=2, line_size=64, dry_run=True))
    assert on_patched.diff == ""


def test_a_user_branch_with_local_commits_stays_as_it_was(fixture_repo: tuple[Path, Path], tmp_path: Path) -> None:
    """A clone on a branch of its own, with commits of its own and an ignored build directory: apply bases
    its branch on that branch's commit and leaves the branch, HEAD, index and every file where they were."""
    repo, db = fixture_repo
    _git(repo, "switch", "-q", "-c", "my-work")
    kernels = repo / "ggml/src/ggml-cpu/fx_kernels.c"
    kernels.write_text(kernels.read_text() + "\n/* a local change */\n")
    (repo / ".gitignore").write_text("build/\n")
    _git(repo, "commit", "-qam", "local change")
    _git(repo, "add", ".gitignore")
    _git(repo, "commit", "-qm", "ignore the build directory")
    (repo / "build").mkdir()
    (repo / "build" / "stale.o").write_bytes(b"\x7fELF")
    head = _git(repo, "rev-parse", "HEAD").strip()
    main_tip = _git(repo, "rev-parse", "main").strip()
    files = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    result = apply(ApplyOptions(repo=repo, sites=("fx_dot_blocks",), build=False, compile_db=db,
                                out=tmp_path / "out", distance=512, hint=3, line_size=64))
    assert result.base_commit == head and result.branch == f"amppatch/{result.id}"
    assert _git(repo, "rev-parse", f"{result.branch}^").strip() == head  # built on the user's commits
    assert "/* a local change */" in _git(repo, "show", f"{result.branch}:ggml/src/ggml-cpu/fx_kernels.c")
    # the user's branch, HEAD, index, the other branches and every file are as they were
    assert _git(repo, "symbolic-ref", "--short", "HEAD").strip() == "my-work"
    assert _git(repo, "rev-parse", "HEAD").strip() == head and _git(repo, "rev-parse", "main").strip() == main_tip
    assert _git(repo, "status", "--porcelain", "--ignored") == "!! build/\n"
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts} == files
    assert _git(repo, "branch", "--list", "--format=%(refname:short)").split() == [result.branch, "main", "my-work"]


def test_dirty_tree_is_refused_naming_the_files(fixture_repo: tuple[Path, Path]) -> None:
    repo, db = fixture_repo
    (repo / "ggml/src/ggml-cpu/fx_vec.cpp").write_text("// changed\n")
    (repo / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"fx_vec\.cpp.*notes\.txt|notes\.txt.*fx_vec\.cpp"):
        apply(ApplyOptions(repo=repo, sites=("fx_dot_blocks",), build=False, compile_db=db))


def test_dry_run_prints_the_diff_and_touches_nothing(fixture_repo: tuple[Path, Path], tmp_path: Path) -> None:
    repo, db = fixture_repo
    result = apply(ApplyOptions(repo=repo, sites=("fx_vec_dot_half",), dry_run=True, compile_db=db,
                                out=tmp_path / "out"))
    assert result.diff.startswith("--- a/ggml/src/ggml-cpu/fx_vec.cpp")
    assert "+            __builtin_prefetch((const char *)(x + i) + 2048, 0, 3);" in result.diff
    assert result.branch is None and not (tmp_path / "out").exists()
    assert _git(repo, "branch", "--list", "amppatch/*") == ""


def _prefetches_by_symbol(obj: Path, addresses: dict[str, list[str]] | None = None) -> dict[str, int]:
    """prefetch* instructions per (demangled) symbol of an object file or library (objdump -d -C);
    with `addresses`, also their addresses per symbol."""
    out = run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)]).stdout
    counts: dict[str, int] = {}
    current = ""
    for line in out.splitlines():
        if line.endswith(">:") and "<" in line:
            current = line[line.index("<") + 1 : -2]
            counts.setdefault(current, 0)
        elif "\tprefetch" in line:
            counts[current] = counts.get(current, 0) + 1
            if addresses is not None:
                addresses.setdefault(current, []).append(line.split(":", 1)[0].strip())
    return counts


def test_wrapper_site_lands_in_the_live_specialization_only(fixture_repo: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """A site on a wrapper without loops (as ggml_gemv_q4_0_8x8_q8_0 is on x86) resolves to the template
    it calls in the live #if branch, for that specialization only: the other specialization of the same
    loop compiles to no prefetch at all."""
    repo, db = fixture_repo
    result = apply(ApplyOptions(repo=repo, sites=("fx_gemv_pack8",), build=False, compile_db=db,
                                out=tmp_path / "out", line_size=64))
    (site,) = result.sites
    assert site.function == "fx_gemv_tmpl<fx_pack8, 8>"  # the FX_NEVER call (pack4) is dead
    assert (site.loop.ordinal, site.stream.expression, site.stream.bytes_per_iteration) == (1, "w_row[b]", 144)
    assert site.guard == "std::is_same<block_t, fx_pack8>::value && ((ROWS) == (8))"
    assert site.lines == 3 and any("fx_gemv_pack8 has no streaming loop" in w for w in result.warnings)
    patched = tmp_path / "fx_vec.cpp"
    patched.write_text(_git(repo, "show", f"{result.branch}:ggml/src/ggml-cpu/fx_vec.cpp"))
    shutil.copy(repo / "ggml/src/ggml-cpu/fixture_defs.h", tmp_path / "fixture_defs.h")
    obj = tmp_path / "fx_vec.o"
    run(["g++", "-O2", "-std=c++11", "-c", str(patched), "-o", str(obj)])
    counts = _prefetches_by_symbol(obj)
    pack8 = sum(n for sym, n in counts.items() if "pack8" in sym)
    pack4 = sum(n for sym, n in counts.items() if "pack4" in sym)
    assert (pack8, pack4) == (3, 0), counts
    # applying it again changes nothing (same branch, no second commit)
    again = apply(ApplyOptions(repo=repo, sites=("fx_gemv_pack8",), build=False, compile_db=db,
                               out=tmp_path / "out", line_size=64))
    assert again.reused and again.commit == result.commit


def _tamper(repo: Path, branch: str, how: str, tmp_path: Path) -> None:
    """Change `branch` the way a user might, from a scratch worktree (the user's checkout stays as is)."""
    if how == "reset":
        _git(repo, "branch", "-f", branch, "HEAD")
        return
    wt = tmp_path / "tamper"
    _git(repo, "worktree", "add", "-q", str(wt), branch)
    path = wt / "ggml/src/ggml-cpu/fx_kernels.c"
    if how == "extra commit":
        path.write_text(path.read_text() + "/* a later change */\n")
        _git(wt, "commit", "-qam", "a later change")
    else:  # amend the distance
        text = path.read_text()
        assert "+ 1024, 0, 2);" in text
        path.write_text(text.replace("+ 1024, 0, 2);", "+ 4096, 0, 2);"))
        _git(wt, "commit", "-q", "--amend", "-a", "--no-edit")
    _git(repo, "worktree", "remove", "--force", str(wt))


@pytest.mark.parametrize(("how", "says"), [
    ("reset", "points at the base commit"),
    ("extra commit", "1 commit(s) on top of the patch"),
    ("amend", "amended or replaced"),
])
def test_a_tampered_branch_is_refused_not_exported(fixture_repo: tuple[Path, Path], tmp_path: Path,
                                                     how: str, says: str, capsys: pytest.CaptureFixture) -> None:
    from amppatch.cli import main

    repo, db = fixture_repo
    opts = ApplyOptions(repo=repo, sites=("fx_dot_blocks",), build=False, compile_db=db, out=tmp_path / "o1",
                        distance=1024, hint=2, line_size=64)
    first = apply(opts)
    assert first.branch is not None and first.commit is not None
    _tamper(repo, first.branch, how, tmp_path)
    tampered = _git(repo, "rev-parse", first.branch).strip()
    assert tampered != first.commit
    head = _git(repo, "rev-parse", "HEAD").strip()
    refusal = re.escape(f"branch {first.branch} exists but does not hold this request: ") + ".*" + re.escape(says)
    with pytest.raises(UsageError, match=refusal) as exc:
        apply(dataclasses.replace(opts, out=tmp_path / "o2"))
    assert f"git -C {repo} branch -D {first.branch}" in str(exc.value)
    # nothing exported, nothing moved: the branch keeps what the user made of it, the checkout is as it was
    assert not (tmp_path / "o2").exists()
    assert _git(repo, "rev-parse", first.branch).strip() == tampered
    assert _git(repo, "rev-parse", "HEAD").strip() == head and _git(repo, "status", "--porcelain") == ""
    # on the command line: one line that says what to do, a usage exit code, no outputs
    argv = ["apply", "--repo", str(repo), "--site", "fx_dot_blocks", "--distance", "1024", "--hint", "2",
            "--no-build", "--compile-db", str(db), "-o", str(tmp_path / "o3")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"amppatch: error: branch {first.branch} exists") and "branch -D" in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o3").exists()
    # removed as told, the same request makes the same commit again (the commit is deterministic)
    _git(repo, "branch", "-D", first.branch)
    again = apply(dataclasses.replace(opts, out=tmp_path / "o2"))
    assert not again.reused and again.commit == first.commit
    assert again.patch_path is not None and again.patch_path.read_text() == first.patch_path.read_text()


def test_an_export_that_disagrees_with_its_manifest_is_not_written(fixture_repo: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import amppatch.patch.stage

    repo, db = fixture_repo
    opts = ApplyOptions(repo=repo, sites=("fx_dot_blocks",), build=False, compile_db=db, out=tmp_path / "out",
                        line_size=64)
    seen: list[str] = []

    def disagree(patch_text: str, manifest: dict) -> list[str]:
        seen.append(patch_text)
        return ["the patch prefetches 1 B ahead, the manifest says 2048"]

    monkeypatch.setattr(amppatch.patch.stage, "check_export", disagree)  # where apply looks it up
    with pytest.raises(AmppatchError, match="does not match its manifest: the patch prefetches 1 B ahead"):
        apply(opts)
    # it was asked about the real export; the new branch is gone and no output claims success
    assert seen and seen[0].startswith("From ")
    assert _git(repo, "branch", "--list", "amppatch/*") == "" and not (tmp_path / "out").exists()


def test_a_tree_cmake_writes_no_compile_commands_for_is_one_clear_error(fixture_repo: tuple[Path, Path],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    repo, _ = fixture_repo  # its CMakeLists.txt declares nothing: configure succeeds and writes no database
    cache = tmp_path / "cache"
    monkeypatch.setenv("AMPPATCH_CACHE_DIR", str(cache))
    with pytest.raises(UsageError, match=r"wrote no compile_commands\.json"):
        apply(ApplyOptions(repo=repo, sites=("fx_dot_blocks",), build=False, out=tmp_path / "out", line_size=64))
    # no empty cache entry that a later run would take for a finished one
    assert not any(p.name.startswith("configure-") for p in (cache / "builds").iterdir())


# ----------------------------------------------------------------------------------------------------------
# The real tree


def _cleanup_branch(repo: Path, branch: str | None) -> None:
    if branch and GitRepo(repo).branch_commit(branch):
        GitRepo(repo).delete_branch(branch)


def _assert_repo_as_before(repo: Path, head: str, branch_name: str) -> None:
    assert _git(repo, "rev-parse", "HEAD").strip() == head
    assert _git(repo, "symbolic-ref", "--short", "HEAD").strip() == branch_name
    assert _git(repo, "status", "--porcelain") == ""


def _real_kernel(llama_repo: Path, native_build, model: Path, site: str, tmp_path: Path, *,
                 tunable: bool = False, gate_args: tuple[str, ...] = (), sized: bool = True) -> dict:
    head = _git(llama_repo, "rev-parse", "HEAD").strip()
    branch_name = _git(llama_repo, "symbolic-ref", "--short", "HEAD").strip()
    result = None
    try:
        result = apply(ApplyOptions(repo=llama_repo, sites=(site,), out=tmp_path / "out", gate_model=model,
                                    tunable=tunable, gate_args=gate_args))
        _assert_repo_as_before(llama_repo, head, branch_name)
        manifest = json.loads(result.manifest_path.read_text())
        (s,) = manifest["sites"]
        assert s["live"] is True and (not sized or (s["element_size"] and s["bytes_per_iteration"]))
        assert manifest["builds"]["a"] == str(native_build.dir)  # same options as the native build: reused
        gate = manifest["gate"]
        assert gate["passed"] and gate["tokens_a"] == gate["tokens_b"] and gate["ppl_a"] == gate["ppl_b"]
        assert gate["function_hits"][s["function"]] > 0  # the patched function really ran in B
        # the compiled kernel really holds the prefetches: one per cache line (x4 localities when tunable),
        # and no other function of the CPU backend gained or lost one
        expected = s["lines_per_iteration"] * (4 if tunable else 1)
        where: dict[str, list[str]] = {}
        lib_b_path = Path(manifest["builds"]["b"]) / "bin" / "libggml-cpu.so"
        lib_a = _prefetches_by_symbol(Path(manifest["builds"]["a"]) / "bin" / "libggml-cpu.so")
        lib_b = _prefetches_by_symbol(lib_b_path, where)
        changed = {sym: lib_b.get(sym, 0) - lib_a.get(sym, 0) for sym in set(lib_a) | set(lib_b)
                   if lib_b.get(sym, 0) != lib_a.get(sym, 0)}
        # one symbol gained them: the site's function, or the one it is inlined into (once per inlined copy)
        assert len(changed) == 1, changed
        ((symbol, gained),) = changed.items()
        assert gained > 0 and gained % expected == 0, (symbol, gained, expected)
        # ... and each of B's prefetches there comes from a line amppatch inserted (debug line info)
        lines = run(["addr2line", "-e", str(lib_b_path), *where[symbol]]).stdout.split()
        marked = 0
        for loc in lines:
            file, _, number = loc.rpartition(":")
            file = os.path.normpath(file)
            rel = file[file.index("ggml/src/"):] if "ggml/src/" in file else None
            if rel is None or not number.isdigit():
                continue
            if rel.endswith("amppatch-tunables.h"):  # the tunable helper, inlined: generated by amppatch
                marked += 1
                continue
            text = _git(llama_repo, "show", f"{manifest['commit']}:{rel}").splitlines()
            marked += "amppatch:" in text[int(number) - 1]
        assert marked == gained, (symbol, lines)
        if tunable:
            from amppatch.build import load_build
            from amppatch.gate import GateOptions, run_gate

            # other knob values compute the same thing too (prefetches never change results)
            env = manifest["sites"][0]["env"]
            knobs = {env["distance"]: "512", env["hint"]: "0"}
            again = run_gate(load_build(Path(manifest["builds"]["a"])), load_build(Path(manifest["builds"]["b"])),
                             GateOptions(model=model, extra_args=tuple(gate["args"])), env_b=knobs)
            assert again.passed
        return manifest
    finally:
        _cleanup_branch(llama_repo, result.branch if result else None)
        _assert_repo_as_before(llama_repo, head, branch_name)


def test_q8_0_end_to_end(llama_repo: Path, native_build, tiny_model_q8_0: Path, tmp_path: Path) -> None:
    manifest = _real_kernel(llama_repo, native_build, tiny_model_q8_0, "ggml_vec_dot_q8_0_q8_0", tmp_path)
    (s,) = manifest["sites"]
    assert (s["stream"], s["element_size"], s["guard"]) == ("x[ib]", 34, "#if defined(__AVX2__)")
    # llama.cpp's own kernel test ran on B (built beside it, not in it) and checked q8_0's vec_dot
    kt = manifest["gate"]["kernel_test"]
    assert (kt["test"], kt["status"]) == ("test-quantize-fns", "passed"), kt
    site = kt["sites"]["ggml_vec_dot_q8_0_q8_0"]
    assert site["type"] == "q8_0" and site["status"] == "passed"
    assert "dot product error: ok" in site["checks"]
    assert Path(kt["side_build"]).name == Path(manifest["builds"]["b"]).name + "-tests"
    assert not (Path(manifest["builds"]["b"]) / "bin" / "test-quantize-fns").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("function", "fixture", "bytes_per_iteration"), [
    ("ggml_vec_dot_q4_0_q8_0", "tiny_model_q4_0", 18),
    ("ggml_vec_dot_q4_K_q8_K", "tiny_model_q4_k", 144),
    ("ggml_vec_dot_q6_K_q8_K", "tiny_model_q6_k", 210),
    ("ggml_vec_dot_f16", "tiny_model_f16", None),  # 64 or 128 B: depends on the ISA (AVX2 vs AVX512)
])
def test_other_kernels_end_to_end(llama_repo: Path, native_build, function: str, fixture: str,
                                  bytes_per_iteration: int | None, request: pytest.FixtureRequest,
                                  tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    manifest = _real_kernel(llama_repo, native_build, model, function, tmp_path)
    (s,) = manifest["sites"]
    if bytes_per_iteration is not None:
        assert s["bytes_per_iteration"] == bytes_per_iteration
    else:
        assert s["bytes_per_iteration"] in (64, 128)


@pytest.mark.slow
@pytest.mark.parametrize(("site", "fixture", "function", "bytes_per_iteration"), [
    # on x86 the wrapper only calls a template: the site lands in its block_q4_0x8 specialization
    ("ggml_gemv_q4_0_8x8_q8_0", "tiny_model_q4_0", "gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>", 144),
    # the same specialization as the profile names it (from the symbol): gdb must still find it to count hits
    ("gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8>>:2:b_ptr[b]", "tiny_model_q4_0",
     "gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8>>", 144),
    ("ggml_gemv_q4_K_8x8_q8_K", "tiny_model_q4_k", "ggml_gemv_q4_K_8x8_q8_K", 1152),
])
def test_repack_gemv_end_to_end(llama_repo: Path, native_build, site: str, fixture: str, function: str,
                                bytes_per_iteration: int, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The repack GEMVs (weights in the CPU_REPACK buffer, i.e. without --repack 0) patch, build,
    pass the gate, run, and hold prefetches in that one function only."""
    model = request.getfixturevalue(fixture)
    manifest = _real_kernel(llama_repo, native_build, model, site, tmp_path)
    (s,) = manifest["sites"]
    assert (s["function"], s["stream"], s["bytes_per_iteration"]) == (function, "b_ptr[b]", bytes_per_iteration)
    assert "-nr" not in manifest["gate"]["args"]  # the repack buffer stays on: that is where these run


@pytest.mark.slow
def test_flash_attention_kv_loop_end_to_end(llama_repo: Path, native_build, tiny_model_q8_0: Path,
                                            tmp_path: Path) -> None:
    """The KV-position loop of flash attention; the K row pointer is declared in the loop body, so
    the prefetch goes right after its declaration. `-fa on` makes the kernel run in the gate."""
    site = "ggml_compute_forward_flash_attn_ext_f16_one_chunk:1:k_data"
    manifest = _real_kernel(llama_repo, native_build, tiny_model_q8_0, site, tmp_path, sized=False,
                            gate_args=("-fa", "on"))
    (s,) = manifest["sites"]
    assert (s["stream"], s["stream_kind"]) == ("k_data", "row")


def _assert_every_site_gated_and_hit(manifest_path: Path, *, n_sites: int, n_runs: int) -> None:
    """An all-at-once build: one gate run per weight type, each identical, every patched function hit."""
    manifest = json.loads(manifest_path.read_text())
    gate = manifest["gate"]
    assert len(manifest["sites"]) == n_sites and len(gate["runs"]) == n_runs
    assert all(r["passed"] and r["tokens_a"] == r["tokens_b"] and r["ppl_a"] == r["ppl_b"] for r in gate["runs"])
    assert set(gate["function_hits"]) == {s["function"] for s in manifest["sites"]}
    assert all(n > 0 for n in gate["function_hits"].values()), gate["function_hits"]


_PART_TWO_SITES = ("ggml_gemv_q4_0_8x8_q8_0", "ggml_gemv_q4_K_8x8_q8_K",
                   "ggml_compute_forward_flash_attn_ext_f16_one_chunk:1:k_data")


@pytest.mark.slow
def test_part_two_sites_all_at_once(llama_repo: Path, native_build, tmp_path: Path) -> None:
    """Every repack-GEMV and flash-attention kernel that runs here, patched in one build: it builds, and the
    gate (one run per weight type: Q4_0 and Q4_K synthetic models, flash attention on) passes with every
    function hit."""
    result = apply(ApplyOptions(repo=llama_repo, sites=_PART_TWO_SITES, out=tmp_path / "out",
                                gate_args=("-fa", "on")))
    try:
        _assert_every_site_gated_and_hit(result.manifest_path, n_sites=3, n_runs=2)
    finally:
        _cleanup_branch(llama_repo, result.branch)


@pytest.mark.slow
def test_tunable_knobs_reach_their_own_site_only(llama_repo: Path, native_build, tiny_model_q4_0: Path,
                                                  tmp_path: Path) -> None:
    """In a tunable build with a GEMV site (repack.cpp) and a flash-attention site (ops.cpp), one site's
    environment knobs set that site's distance and hint as its translation unit sees them, and leave the
    other site at its defaults (read from the running process with gdb)."""
    from amppatch.build import load_build, run_env

    sites = (_PART_TWO_SITES[0], _PART_TWO_SITES[2])
    result = apply(ApplyOptions(repo=llama_repo, sites=sites, out=tmp_path / "out", tunable=True, gate=False,
                                distance=2048, hint=3))
    try:
        manifest = json.loads(result.manifest_path.read_text())
        gemv, attn = manifest["sites"]
        build_b = load_build(Path(manifest["builds"]["b"]))

        def knob_values(env: dict[str, str]) -> dict[str, str]:
            slugs = {"gemv": ("repack.cpp", gemv), "attn": ("ops.cpp", attn)}
            prints = []
            for _, (unit, site) in slugs.items():
                slug = site["env"]["distance"].removeprefix("AMPPATCH_").removesuffix("_DISTANCE").lower()
                prints += ["-ex", f"print '{unit}'::amppatch_distance_{slug}",
                           "-ex", f"print '{unit}'::amppatch_hint_{slug}"]
            argv = ["gdb", "-nx", "-batch", "-ex", "set breakpoint pending on", "-ex", "break ggml_gemv_q4_0_8x8_q8_0",
                    "-ex", "run", *prints, "-ex", "kill", "--args", str(build_b.binary("llama-completion")),
                    "-m", str(tiny_model_q4_0), "-p", "hi", "-n", "1", "-t", "1", "-no-cnv", "--no-warmup"]
            out = run(argv, env={**run_env(build_b), **env}, check=False, timeout=600).stdout
            values = [line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("$")]
            assert len(values) == 4, out[-3000:]
            return dict(zip(["gemv_distance", "gemv_hint", "attn_distance", "attn_hint"], values, strict=True))

        assert knob_values({}) == {"gemv_distance": "2048", "gemv_hint": "3", "attn_distance": "2048",
                                   "attn_hint": "3"}
        assert knob_values({gemv["env"]["distance"]: "4096", gemv["env"]["hint"]: "1"}) == {
            "gemv_distance": "4096", "gemv_hint": "1", "attn_distance": "2048", "attn_hint": "3"}
        assert knob_values({attn["env"]["hint"]: "0"}) == {
            "gemv_distance": "2048", "gemv_hint": "3", "attn_distance": "2048", "attn_hint": "0"}
    finally:
        _cleanup_branch(llama_repo, result.branch)


# The AMX buffer's batch-1 kernels: class-template partial specializations whose k loop hands
# its index to a lambda through Unroll<N>; they run on this CPU in an --amx-batch1 build (gate: -ub 1).
_AMX_SITES = [
    ("tinygemm_kernel_vnni<block_q8_0, block_q8_0>::apply", "tiny_model_q8_0"),
    ("tinygemm_kernel_vnni<block_q8_0, block_q4_0>::apply", "tiny_model_q4_0"),
    ("tinygemm_kernel_vnni<block_q8_K, block_q4_K>::apply", "tiny_model_q4_k"),
    ("tinygemm_kernel_vnni<block_q8_K, block_q6_K>::apply", "tiny_model_q6_k"),
    ("tinygemm_kernel_avx<float, ggml_fp16_t>::apply", "tiny_model_f16"),
]


def _amx_symbol(site: str) -> re.Pattern[str]:
    """Every instantiation of the site's partial specialization, as objdump -C names its symbols."""
    owner, member = site.split(">::")
    name, args = owner.split("<", 1)
    # the demangler spells typedefs by what they stand for (ggml_fp16_t is uint16_t)
    fixed = [re.escape(a.strip()).replace("ggml_fp16_t", "(?:ggml_fp16_t|unsigned short)") for a in args.split(",")]
    fixed += [r"[^,<>]+"] * (6 - len(fixed))  # the specialization's own parameters: any value
    return re.compile(rf"^(\(anonymous namespace\)::)?{name}<{', '.join(fixed)}>::{member}\(")


@pytest.mark.slow
@pytest.mark.parametrize(("site", "fixture"), _AMX_SITES)
def test_amx_kernels_end_to_end(llama_repo: Path, amx_build, site: str, fixture: str,
                                request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Patched, built, gate passed (identical tokens and perplexity, -ub 1 because the tile kernels fault
    here), the inserted prefetch lines ran in B (gdb), and objdump shows prefetch instructions only in the
    instantiations of that one specialization, each from a line amppatch inserted."""
    model = request.getfixturevalue(fixture)
    head = _git(llama_repo, "rev-parse", "HEAD").strip()
    branch_name = _git(llama_repo, "symbolic-ref", "--short", "HEAD").strip()
    result = None
    try:
        result = apply(ApplyOptions(repo=llama_repo, sites=(site,), out=tmp_path / "out", gate_model=model,
                                    build_options=BuildOptions(repo=llama_repo, amx_batch1=True)))
        _assert_repo_as_before(llama_repo, head, branch_name)
        manifest = json.loads(result.manifest_path.read_text())
        (s,) = manifest["sites"]
        assert (s["stream_kind"], s["live"]) == ("tile", True) and s["unroll"]
        assert s["file"] == "ggml/src/ggml-cpu/amx/mmq.cpp"
        assert manifest["builds"]["a"] == str(amx_build.dir)
        gate = manifest["gate"]
        assert gate["passed"] and gate["tokens_a"] == gate["tokens_b"] and gate["ppl_a"] == gate["ppl_b"]
        # one token per micro-batch (the tile kernels would fault), one context per perplexity batch
        assert all(c[c.index("-ub") + 1] == "1" for c in gate["commands"]), gate["commands"]
        assert gate["function_hits"][s["function"]] > 0  # the inserted lines really ran in B
        where: dict[str, list[str]] = {}
        lib_b_path = Path(manifest["builds"]["b"]) / "bin" / "libggml-cpu.so"
        lib_a = _prefetches_by_symbol(Path(manifest["builds"]["a"]) / "bin" / "libggml-cpu.so")
        lib_b = _prefetches_by_symbol(lib_b_path, where)
        changed = {sym for sym in set(lib_a) | set(lib_b) if lib_b.get(sym, 0) != lib_a.get(sym, 0)}
        # the specialization's instantiations gained prefetches (or the function one is inlined into) ...
        assert any(_amx_symbol(site).match(sym) for sym in changed), changed
        for sym in changed:
            assert lib_b[sym] > lib_a.get(sym, 0)
            # ... and every prefetch there comes from a line amppatch inserted for this site: none elsewhere
            for loc in run(["addr2line", "-e", str(lib_b_path), *where[sym]]).stdout.split():
                file, _, number = loc.rpartition(":")
                rel = os.path.normpath(file)[os.path.normpath(file).index("ggml/src/"):]
                text = _git(llama_repo, "show", f"{manifest['commit']}:{rel}").splitlines()
                assert f"amppatch: {s['key']}" in text[int(number) - 1], (sym, loc)
    finally:
        _cleanup_branch(llama_repo, result.branch if result else None)
        _assert_repo_as_before(llama_repo, head, branch_name)


@pytest.mark.slow
def test_amx_sites_all_at_once_and_tunable_knobs(llama_repo: Path, amx_build, tiny_model_q8_0: Path,
                                                 tmp_path: Path) -> None:
    """All five AMX kernels and flash attention patched in one --amx-batch1 build: it builds and the gate
    passes for every weight type with every function hit. Then the tunable build of two of them in the
    same unit: one site's knobs reach that site's globals only (read from the running process)."""
    from amppatch.build import load_build, run_env

    sites = (*(s for s, _ in _AMX_SITES), "ggml_compute_forward_flash_attn_ext_f16_one_chunk:1:k_data")
    opts = BuildOptions(repo=llama_repo, amx_batch1=True)
    result = apply(ApplyOptions(repo=llama_repo, sites=sites, out=tmp_path / "out", gate_args=("-fa", "on"),
                                build_options=opts))
    try:
        _assert_every_site_gated_and_hit(result.manifest_path, n_sites=6, n_runs=5)
    finally:
        _cleanup_branch(llama_repo, result.branch)

    two = (_AMX_SITES[0][0], _AMX_SITES[1][0])
    result = apply(ApplyOptions(repo=llama_repo, sites=two, out=tmp_path / "out2", tunable=True, gate=False,
                                distance=2048, hint=3, build_options=opts))
    try:
        manifest = json.loads(result.manifest_path.read_text())
        q8, q4 = manifest["sites"]
        build_b = load_build(Path(manifest["builds"]["b"]))

        def knob_values(env: dict[str, str]) -> list[str]:
            prints = []
            for site in (q8, q4):
                slug = site["env"]["distance"].removeprefix("AMPPATCH_").removesuffix("_DISTANCE").lower()
                prints += ["-ex", f"print 'mmq.cpp'::amppatch_distance_{slug}",
                           "-ex", f"print 'mmq.cpp'::amppatch_hint_{slug}"]
            argv = ["gdb", "-nx", "-batch", "-ex", "set breakpoint pending on", "-ex", "break ggml_backend_amx_mul_mat",
                    "-ex", "run", *prints, "-ex", "kill", "--args", str(build_b.binary("llama-completion")),
                    "-m", str(tiny_model_q8_0), "-p", "hi", "-n", "1", "-t", "1", "-no-cnv", "--no-warmup",
                    "-ub", "1"]
            out = run(argv, env={**run_env(build_b), **env}, check=False, timeout=600).stdout
            values = [line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("$")]
            assert len(values) == 4, out[-3000:]
            return values

        assert knob_values({}) == ["2048", "3", "2048", "3"]
        assert knob_values({q4["env"]["distance"]: "4096", q4["env"]["hint"]: "0"}) == ["2048", "3", "4096", "0"]
        assert knob_values({q8["env"]["hint"]: "1"}) == ["2048", "1", "2048", "3"]
    finally:
        _cleanup_branch(llama_repo, result.branch)


@pytest.mark.slow
def test_tunable_q8_0_end_to_end(llama_repo: Path, native_build, tiny_model_q8_0: Path, tmp_path: Path) -> None:
    manifest = _real_kernel(llama_repo, native_build, tiny_model_q8_0, "ggml_vec_dot_q8_0_q8_0", tmp_path,
                            tunable=True)
    assert {f["path"] for f in manifest["files"]} == {"ggml/src/ggml-cpu/amppatch-tunables.h",
                                                      "ggml/src/ggml-cpu/arch/x86/quants.c"}


@pytest.mark.slow
def test_q4_0_dead_ssse3_branch_is_not_patched(llama_repo: Path, native_build) -> None:
    fa = analyze_function(llama_repo, "ggml_vec_dot_q4_0_q8_0", native_build.dir / "compile_commands.json")
    ssse3 = [lp for lp in fa.loops if lp.guard and "__SSSE3__" in lp.guard]
    assert ssse3 and all(lp.live is False for lp in ssse3)
    assert any(lp.prefetches for lp in ssse3)  # its existing _mm_prefetch calls are seen (and dead)
    with pytest.raises(UsageError, match="no site could be patched"):
        apply(ApplyOptions(repo=llama_repo, sites=(f"ggml_vec_dot_q4_0_q8_0:{ssse3[0].ordinal}",), dry_run=True,
                           compile_db=native_build.dir))


@pytest.mark.slow
def test_patch_that_does_not_compile_is_rejected(llama_repo: Path, native_build, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import amppatch.patch.render as patch_mod  # build_changes looks render_site up there

    real = patch_mod.render_site

    def broken(site, **kw):  # valid syntax for tree-sitter, an undeclared function for the compiler
        return real(site, **kw).replace("__builtin_prefetch(", "amppatch_no_such_function(")

    monkeypatch.setattr(patch_mod, "render_site", broken)
    head = _git(llama_repo, "rev-parse", "HEAD").strip()
    branch_name = _git(llama_repo, "symbolic-ref", "--short", "HEAD").strip()
    branches = _git(llama_repo, "branch", "--list")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="does not compile") as info:
        apply(ApplyOptions(repo=llama_repo, sites=("ggml_vec_dot_q8_0_q8_0",), out=out, gate=False))
    assert "amppatch_no_such_function" in str(info.value)
    _assert_repo_as_before(llama_repo, head, branch_name)
    assert _git(llama_repo, "branch", "--list") == branches  # the branch was removed
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_pre_split_tree_early_2025(tmp_path: Path) -> None:
    """llama-cpp-python 0.3.8's tree keeps every ISA's kernels in ggml-cpu-quants.c (and vec_dot_f16 in
    ggml-cpu.c): apply must find them there, keep only the branches this machine compiles, and patch."""
    from amppatch.workspace import FetchOptions, fetch_llama

    repo = fetch_llama(FetchOptions(version="0.3.8", dest=tmp_path / "llama-0.3.8"))
    sites = ("ggml_vec_dot_q8_0_q8_0", "ggml_vec_dot_q4_0_q8_0", "ggml_vec_dot_q4_K_q8_K",
             "ggml_vec_dot_q6_K_q8_K", "ggml_vec_dot_f16")
    result = apply(ApplyOptions(repo=repo, sites=sites, build=False, out=tmp_path / "out"))
    assert len(result.sites) == len(sites)
    by_function = {s.function: s for s in result.sites}
    for name in sites[:4]:
        assert by_function[name].file == "ggml/src/ggml-cpu/ggml-cpu-quants.c"
    assert by_function["ggml_vec_dot_f16"].file == "ggml/src/ggml-cpu/ggml-cpu.c"
    for s in result.sites:
        assert s.loop.live is True and s.stream.base == "x" and s.stream.bytes_per_iteration
    # loops of other ISAs come first in these functions; they are dead here, not patched
    assert by_function["ggml_vec_dot_q8_0_q8_0"].loop.ordinal > 0
    patched = _git(repo, "show", f"{result.branch}:ggml/src/ggml-cpu/ggml-cpu-quants.c")
    assert patched.count("amppatch: ggml_vec_dot_") >= 4 * 3


@pytest.mark.slow
def test_pre_split_tree_builds_both_arms(tmp_path: Path) -> None:
    """The early-2025 tree's patched kernels compile: A and B of the ggml-cpu library alone (its programs
    are example targets there; the whole gate on an early-2025 tree runs on llama-cpp-python 0.3.9's, the
    oldest supported, in test_old_trees.py)."""
    from amppatch.build import BuildOptions
    from amppatch.workspace import FetchOptions, fetch_llama

    repo = fetch_llama(FetchOptions(version="0.3.8"))
    head = _git(repo, "rev-parse", "HEAD").strip()
    branch_name = _git(repo, "symbolic-ref", "--short", "HEAD").strip()
    result = None
    try:
        result = apply(ApplyOptions(repo=repo, sites=("ggml_vec_dot_q8_0_q8_0", "ggml_vec_dot_q4_K_q8_K"),
                                    out=tmp_path / "out", gate=False,
                                    build_options=BuildOptions(repo=repo, targets=("ggml-cpu",))))
        assert set(result.builds) == {"a", "b"} and result.builds["a"] != result.builds["b"]
        for arm in result.builds.values():
            assert list(Path(arm).glob("bin/libggml-cpu.so*")) or list(Path(arm).rglob("libggml-cpu.*"))
        _assert_repo_as_before(repo, head, branch_name)
    finally:
        _cleanup_branch(repo, result.branch if result else None)


def test_curated_patches_apply_to_the_pinned_tree(llama_repo: Path) -> None:
    """patches/ holds what amppatch generated for the pinned tree; each still applies and names its sites."""
    patches = sorted((Path(__file__).resolve().parents[2] / "patches").glob("*.patch"))
    assert patches
    base = _git(llama_repo, "rev-parse", "HEAD").strip()
    for patch in patches:
        manifest = json.loads(patch.with_suffix(".json").read_text())
        assert manifest["base_commit"] == base and manifest["schema_version"] == 1
        check = run(["git", "-C", str(llama_repo), "apply", "--check", str(patch)], check=False)
        assert check.returncode == 0, (patch.name, check.stderr)
        text = patch.read_text()
        for site in manifest["sites"]:
            assert f"amppatch: {site['key']}" in text


def test_profile_sites_drive_apply_and_another_cpu_is_warned(fixture_repo: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    repo, db = fixture_repo
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "schema_version": 1, "machine": {"cpu_model": "Some Other CPU 9000"},
        "sites": [{"function": "fx_dot_blocks", "loop": "L18", "stream": "y[ib + 1]", "distance_bytes": 768,
                   "hint": 1, "inputs": {"latency_ns": 95.0, "bytes_per_ns": 8.1}}],
    }))
    result = apply(ApplyOptions(repo=repo, profile=profile, build=False, compile_db=db, out=tmp_path / "out"))
    (site,) = result.sites
    assert (site.key, site.request.distance_bytes, site.request.hint) == ("fx_dot_blocks#1 y[ib]", 768, 1)
    assert any("Some Other CPU 9000" in w for w in result.warnings)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["sites"][0]["inputs"] == {"latency_ns": 95.0, "bytes_per_ns": 8.1}
    assert manifest["sites"][0]["origin"] == "profile"
