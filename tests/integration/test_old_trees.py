"""Trees older than the pinned one: the programs a tree declares drive the build and the gate, and a tree
older than amppatch supports is refused with one error.

Default tier: the refusal, on a small git repository shaped like llama.cpp. Slow tier: llama-cpp-python
0.3.9's tree (kernels in ggml-cpu-quants.c, greedy completion by llama-cli) fetched, patched, built and
gated end to end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from amppatch.proc import run
from amppatch.workspace import OLDEST_SUPPORTED_VERSION

_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t"}
ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    return run(["git", "-C", str(repo), *args], env={**os.environ, **_IDENTITY}).stdout


def _amppatch(*args: str) -> tuple[int, list[str], str]:
    done = run([sys.executable, "-m", "amppatch", *args], check=False, cwd=ROOT,
               env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.returncode, done.stderr.strip().splitlines(), done.stdout


def test_a_tree_without_the_programs_is_refused_before_any_build(tmp_path: Path) -> None:
    """A llama.cpp-shaped tree whose CMakeLists declare only llama-bench: one line naming the tree by its
    commit, what it lacks and the oldest supported version, before anything is configured."""
    repo = tmp_path / "llama.cpp"
    for d in ("include", "ggml/src/ggml-cpu", "tools/llama-bench"):
        (repo / d).mkdir(parents=True)
    (repo / "include" / "llama.h").write_text("/* llama */\n")
    (repo / "CMakeLists.txt").write_text("project(llama)\n")
    (repo / "tools/llama-bench/CMakeLists.txt").write_text("set(TARGET llama-bench)\nadd_executable(${TARGET} b.cpp)\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "old")
    commit = _git(repo, "rev-parse", "HEAD").strip()
    code, err, out = _amppatch("build", "--repo", str(repo))
    assert code == 2 and out == ""
    assert len(err) == 1, err
    assert err[0].startswith(f"amppatch: error: {repo} (commit {commit[:12]}) is older than amppatch supports: "
                             "it declares no llama-completion or llama-cli, llama-quantize, llama-perplexity program")
    assert f"llama-cpp-python {OLDEST_SUPPORTED_VERSION}" in err[0]
    # without the CPU backend's directory the tree is too old for anything amppatch does
    (repo / "ggml/src/ggml-cpu").rmdir()  # an empty directory: git never had it, the tree stays clean
    code, err, _ = _amppatch("build", "--repo", str(repo), "--target", "ggml-cpu")
    assert code == 2 and len(err) == 1 and "no ggml/src/ggml-cpu directory" in err[0], err


@pytest.mark.slow
def test_the_oldest_supported_tree_is_patched_built_and_gated(tmp_path: Path) -> None:
    """llama-cpp-python 0.3.9's llama.cpp, cloned as a user's checkout: the q8_0 kernel is found in
    ggml-cpu-quants.c, A and B build their programs (llama-cli, not llama-completion), B computes what A
    computes, the kernel provably ran, and test-quantize-fns checks it."""
    from amppatch.patch import ApplyOptions, apply
    from amppatch.workspace import FetchOptions, fetch_llama

    repo = fetch_llama(FetchOptions(version=OLDEST_SUPPORTED_VERSION, dest=tmp_path / "llama.cpp"))
    head = _git(repo, "rev-parse", "HEAD").strip()
    result = apply(ApplyOptions(repo=repo, sites=("ggml_vec_dot_q8_0_q8_0",), out=tmp_path / "out"))
    site = result.sites[0]
    assert site.file == "ggml/src/ggml-cpu/ggml-cpu-quants.c" and site.loop.live
    assert _git(repo, "rev-parse", "HEAD").strip() == head and _git(repo, "status", "--porcelain") == ""
    assert _git(repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    for arm in ("a", "b"):
        manifest = json.loads((Path(result.builds[arm]) / "manifest.json").read_text())
        assert manifest["programs"]["completion"] == "llama-cli"
        assert manifest["programs"]["kernel_test"] == "test-quantize-fns"
        assert (Path(result.builds[arm]) / "bin" / "llama-cli").is_file()
    gate = result.gate
    assert gate is not None and gate["passed"] and gate["tokens_a"] == gate["tokens_b"]
    assert Path(gate["commands"][0][0]).name == "llama-cli"
    assert "--no-warmup" not in gate["commands"][1] and "-nr" not in gate["args"]  # 0.3.9 takes neither there
    assert gate["function_hits"]["ggml_vec_dot_q8_0_q8_0"] > 0
    assert gate["kernel_test"]["status"] == "passed"
    saved = json.loads(result.manifest_path.read_text())
    assert saved["gate"]["passed"] and saved["base_commit"] == head
