"""Fresh machine to builds and a model: fetch, build (and its reuse), synthesize, run; CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amppatch.build import Build, BuildOptions, build, load_build, resolve, run_env
from amppatch.cli import main
from amppatch.workspace import FetchOptions, fetch_llama


def test_fetched_tree_is_a_clean_git_repo_with_one_commit(llama_repo: Path):
    log = subprocess.run(["git", "-C", str(llama_repo), "log", "--oneline"], capture_output=True, text=True)
    assert len(log.stdout.splitlines()) == 1
    status = subprocess.run(["git", "-C", str(llama_repo), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == ""
    assert (llama_repo / "ggml" / "src" / "ggml-cpu").is_dir()
    assert (llama_repo / ".git").is_dir()  # a real repository, not the sdist's submodule pointer file
    # Second call: cached, same path.
    assert fetch_llama(FetchOptions()) == llama_repo


def test_fetch_dest_clones_the_cached_tree(llama_repo: Path, tmp_path: Path):
    dest = fetch_llama(FetchOptions(dest=tmp_path / "mine"))
    assert dest == (tmp_path / "mine").resolve()
    head = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    base = subprocess.run(["git", "-C", str(llama_repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert head == base


def test_native_build_has_manifest_and_tools(native_build: Build, llama_repo: Path):
    m = native_build.manifest
    assert m["schema_version"] == 1 and m["repo"] == str(llama_repo)
    for key in ("commit", "compiler", "compiler_version", "cmake_options", "targets", "build_seconds", "isa"):
        assert key in m
    assert m["cmake_options"]["GGML_NATIVE"] == "ON"
    assert m["cmake_options"]["LLAMA_BUILD_SERVER"] == "OFF"
    for tool in ("llama-bench", "llama-completion", "llama-quantize", "llama-perplexity"):
        assert native_build.binary(tool).is_file()
    commands = json.loads((native_build.dir / "compile_commands.json").read_text())
    assert all(" -g " in c["command"] + " " for c in commands if c["file"].endswith((".c", ".cpp")))


def test_identical_request_reuses_the_build(native_build: Build, llama_repo: Path):
    again = build(BuildOptions(repo=llama_repo, name="native"))
    assert again.dir == native_build.dir
    assert again.manifest["created"] == native_build.manifest["created"]
    assert load_build(native_build.dir / "manifest.json").dir == native_build.dir


def test_uncommitted_change_changes_the_key(llama_repo: Path, tmp_path: Path):
    clone = fetch_llama(FetchOptions(dest=tmp_path / "clone"))
    clean = resolve(BuildOptions(repo=clone))
    target = clone / "ggml" / "src" / "ggml-cpu" / "vec.cpp"
    target.write_text(target.read_text() + "\n// local edit\n")
    dirty = resolve(BuildOptions(repo=clone))
    assert dirty.key != clean.key and dirty.in_place and dirty.dirty_hash
    target.write_text(target.read_text() + "// another edit\n")
    again = resolve(BuildOptions(repo=clone))
    assert again.key != dirty.key
    # ...but the same build directory, so the second edit rebuilds incrementally.
    assert again.dir_key == dirty.dir_key


def test_tiny_model_generates_with_llama_bench(native_build: Build, tiny_model_q8_0: Path):
    done = subprocess.run(
        [str(native_build.binary("llama-bench")), "-m", str(tiny_model_q8_0), "-p", "0", "-n", "8", "-r", "1",
         "-t", "1", "-o", "jsonl"],
        capture_output=True, text=True, env=run_env(native_build), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["n_gen"] == 8 and row["avg_ts"] > 0


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_errors_are_one_line_with_next_step(tmp_path: Path, capsys, llama_repo: Path):
    not_llama = tmp_path / "plain"
    not_llama.mkdir()
    cases = [
        ["build", "--repo", str(tmp_path / "missing")],
        ["build", "--repo", str(not_llama)],
        ["llama", "fetch", "--version", "banana"],
        ["model", "synth", "-o", str(tmp_path / "nowhere" / "m.gguf"), "--repo", str(llama_repo)],
    ]
    for args in cases:
        code, _, err = _cli(args, capsys)
        assert code != 0, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("amppatch: error:") and " — " in lines[0], (args, err)
    assert not (tmp_path / "nowhere").exists()


def test_cli_prints_result_path_last(capsys, llama_repo: Path, native_build: Build):
    code, out, _ = _cli(["llama", "fetch"], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == str(llama_repo)
    code, out, _ = _cli(["build", "--repo", str(llama_repo), "--name", "native"], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == str(native_build.dir)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "amppatch", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "llama" in done.stdout


def test_clean_shows_sizes_and_removes_only_its_cache(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("AMPPATCH_CACHE_DIR", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / "x.gguf").write_bytes(b"\0" * 4096)
    code, out, _ = _cli(["clean", "--kind", "models", "--dry-run"], capsys)
    assert code == 0 and "x.gguf" in out and (models / "x.gguf").exists()
    code, out, _ = _cli(["clean", "--kind", "models"], capsys)
    assert code == 0 and not (models / "x.gguf").exists()


def test_doctor_reports_isa_and_writes_json(tmp_path: Path, capsys):
    code, _, _ = _cli(["doctor", "-o", str(tmp_path / "d.json")], capsys)
    assert code == 0
    data = json.loads((tmp_path / "d.json").read_text())
    names = {c["name"] for c in data["checks"]}
    assert {"cc", "cmake", "git", "hardware counters"} <= names
    assert any(n.startswith("isa:") for n in names) or os.uname().machine != "x86_64"


@pytest.mark.slow
def test_kernel_cflags_reach_only_the_cpu_backend(llama_repo: Path):
    b = build(BuildOptions(repo=llama_repo, name="kernel-flags", kernel_cflags="-fprefetch-loop-arrays"))
    commands = json.loads((b.dir / "compile_commands.json").read_text())
    with_flag = {c["file"] for c in commands if "-fprefetch-loop-arrays" in c["command"]}
    assert with_flag and all("/ggml-cpu/" in f for f in with_flag)
    assert all("-fprefetch-loop-arrays" in c["command"] for c in commands if "/ggml-cpu/" in c["file"])


@pytest.mark.slow
def test_pgo_build_trains_and_uses_a_profile(llama_repo: Path, tiny_model_q8_0: Path):
    b = build(BuildOptions(repo=llama_repo, name="pgo", pgo=True, pgo_models=(tiny_model_q8_0,)))
    assert b.manifest["pgo"] and any(p.suffix == ".gcda" for p in (b.dir / "pgo-data").rglob("*"))
    commands = json.loads((b.dir / "compile_commands.json").read_text())
    cpu = [c["command"] for c in commands if "/ggml-cpu/" in c["file"]]
    assert cpu and all("-fprofile-use=" in c for c in cpu)
    assert not any("-fprofile" in c["command"] for c in commands if "/ggml-cpu/" not in c["file"])
    done = subprocess.run(
        [str(b.binary("llama-bench")), "-m", str(tiny_model_q8_0), "-p", "0", "-n", "4", "-r", "1", "-o", "jsonl"],
        capture_output=True, text=True, env=run_env(b), timeout=300,
    )
    assert done.returncode == 0, done.stderr
