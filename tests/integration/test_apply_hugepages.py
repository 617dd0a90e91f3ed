"""`apply --hugepages` on real git and on the pinned llama.cpp tree: the huge-page lever is committed, exported,
gated and measured like a prefetch site, alone or in one commit with one.

The fixture repo (no build: seconds) holds our own stand-in for llama.cpp's weight mapping and our C kernels;
the pinned tree builds B twice (the lever alone, the lever with the Q8_0 site; ccache) and reuses the lever's
B for the run with THP `never` simulated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from amppatch.build import load_build
from amppatch.pages import thp_enabled_mode, verify_hugepages
from amppatch.patch import ApplyManifest, ApplyOptions, GitRepo, apply, check_export
from amppatch.proc import run

ROOT = Path(__file__).resolve().parents[1]
_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo: Path, *args: str) -> str:
    return run(["git", "-C", str(repo), *args], env={**os.environ, **_IDENTITY}).stdout


@pytest.fixture()
def mmap_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A llama.cpp-shaped git repo: our weight-mapping stand-in in src/, our C kernels in the CPU backend, and a
    compile database for the kernels."""
    repo = tmp_path / "repo"
    cpu = repo / "ggml" / "src" / "ggml-cpu"
    cpu.mkdir(parents=True)
    (repo / "src").mkdir()
    (repo / "include").mkdir()
    (repo / "include" / "llama.h").write_text("/* fixture */\n")
    (repo / "CMakeLists.txt").write_text("# fixture\n")
    shutil.copy(ROOT / "fixtures_pages" / "llama-mmap.cpp", repo / "src" / "llama-mmap.cpp")
    for name in ("fx_kernels.c", "fixture_defs.h"):
        shutil.copy(ROOT / "fixtures" / name, cpu / name)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "fixture base")
    db = tmp_path / "build" / "compile_commands.json"
    db.parent.mkdir()
    db.write_text(json.dumps([{"directory": str(db.parent), "file": str(cpu / "fx_kernels.c"),
                               "command": f"gcc -DFX_MID -I{cpu} -O2 -o k.o -c {cpu / 'fx_kernels.c'}"}]))
    return repo, db


def _branches(repo: Path) -> list[str]:
    return _git(repo, "branch", "--list", "amppatch/*", "--format=%(refname:short)").split()


def test_the_lever_alone_is_committed_exported_and_a_second_apply_changes_nothing(mmap_repo: tuple[Path, Path],
                                                                                  tmp_path: Path) -> None:
    repo, _ = mmap_repo
    head = _git(repo, "rev-parse", "HEAD").strip()
    dry = apply(ApplyOptions(repo=repo, hugepages=True, dry_run=True))
    assert "+#if defined(__linux__) && defined(_POSIX_MAPPED_FILES) /* amppatch: hugepages */" in dry.diff
    assert "+        if (amppatch_thp_wanted()) { /* amppatch: hugepages */" in dry.diff
    assert _branches(repo) == [] and _git(repo, "status", "--porcelain") == ""

    out = tmp_path / "out"
    first = apply(ApplyOptions(repo=repo, hugepages=True, build=False, out=out))
    assert first.manifest is not None and first.patch_path is not None and first.commit is not None
    manifest = first.manifest
    assert manifest.sites == () and manifest.levers == ("hugepages",)
    assert [f["path"] for f in manifest.files] == ["src/llama-mmap.cpp"] and manifest.files[0]["lever"] == "hugepages"
    assert manifest.hugepages is not None and manifest.hugepages["status"] in ("not-measured", "thp-never")
    assert "--no-build" in manifest.hugepages["note"] or manifest.hugepages["status"] == "thp-never"
    patch_text = first.patch_path.read_text()
    assert check_export(patch_text, manifest.to_json()) == []
    message = _git(repo, "log", "-1", "--format=%B", first.commit)
    assert message.startswith(f"amppatch: hugepages lever [{first.id}]")
    assert re.search(r"^Lever: hugepages \(src/llama-mmap\.cpp:52\): ", message, re.MULTILINE)
    # the user's branch, index and files are untouched
    assert _git(repo, "rev-parse", "HEAD").strip() == head and _git(repo, "status", "--porcelain") == ""

    second = apply(ApplyOptions(repo=repo, hugepages=True, build=False, out=out))
    assert (second.id, second.commit, second.reused) == (first.id, first.commit, True)
    assert first.patch_path.read_text() == patch_text and _branches(repo) == [first.branch]

    # on a tree that already carries the lever there is nothing to do
    _git(repo, "checkout", "-q", str(first.branch))
    again = apply(ApplyOptions(repo=repo, hugepages=True, build=False, out=tmp_path / "out2"))
    assert again.id is None and again.diff == ""
    assert "hugepages: the tree already carries the huge-page lever; unchanged" in again.warnings


def test_a_site_and_the_lever_are_one_commit_with_its_own_id(mmap_repo: tuple[Path, Path], tmp_path: Path) -> None:
    repo, db = mmap_repo
    site_only = apply(ApplyOptions(repo=repo, sites=("fx_dot_blocks",), compile_db=db, build=False,
                                   out=tmp_path / "a"))
    both = apply(ApplyOptions(repo=repo, sites=("fx_dot_blocks",), hugepages=True, compile_db=db, build=False,
                              out=tmp_path / "b"))
    assert both.id != site_only.id and both.manifest is not None and both.patch_path is not None
    assert site_only.manifest is not None and site_only.manifest.levers == ()
    assert {f["path"] for f in both.manifest.files} == {"src/llama-mmap.cpp", "ggml/src/ggml-cpu/fx_kernels.c"}
    assert [s["key"] for s in both.manifest.sites] == [s["key"] for s in site_only.manifest.sites]
    text = both.patch_path.read_text()
    assert check_export(text, both.manifest.to_json()) == []
    subject = _git(repo, "log", "-1", "--format=%s", str(both.commit)).strip()
    assert subject == f"amppatch: software prefetch at 1 site(s), hugepages lever [{both.id}]"
    # the manifest without the lever does not match this patch: an export never differs from its manifest
    assert check_export(text, {**both.manifest.to_json(), "levers": []})
    assert sorted(_branches(repo)) == sorted([str(site_only.branch), str(both.branch)])


# ----------------------------------------------------------------------------------------------------------
# The pinned tree


def _assert_lever_measured(manifest: ApplyManifest) -> None:
    """The measured record where this machine's THP lets the lever work (the tiny Q8_0 model is ~19 MiB:
    nine 2 MiB pages)."""
    pages = manifest.hugepages
    assert pages is not None and set(pages) == {"thp_enabled", "status", "share_a", "share_b", "huge_bytes_b",
                                                "weight_bytes", "note"}
    if thp_enabled_mode({}) == "never":
        assert pages["status"] == "thp-never", pages
        return
    assert pages["status"] in ("verified", "small-pages"), pages
    if pages["status"] == "small-pages":
        # Huge folios need free unfragmented 2 MiB blocks; while other builds fill the page cache there may be
        # too few for a moment. Apply records that as it is (fail safe); the lever's claim is checked again.
        assert manifest.gate is not None and manifest.build_a and manifest.build_b
        for _ in range(3):
            pages = verify_hugepages(load_build(Path(manifest.build_a)), load_build(Path(manifest.build_b)),
                                     Path(manifest.gate["model"]))
            if pages["status"] == "verified":
                break
    assert pages["status"] == "verified", pages
    assert pages["share_b"] >= 0.5 and pages["huge_bytes_b"] >= 8 << 20 and pages["weight_bytes"] > 16 << 20
    assert "the lever reported: " in pages["note"]


def _cleanup(repo: Path, *branches: str | None) -> None:
    for branch in branches:
        if branch and GitRepo(repo).branch_commit(branch):
            GitRepo(repo).delete_branch(branch)


def test_the_lever_alone_on_the_pinned_tree_and_with_thp_never(llama_repo: Path, native_build, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    head = _git(llama_repo, "rev-parse", "HEAD").strip()
    result = None
    try:
        result = apply(ApplyOptions(repo=llama_repo, hugepages=True, out=tmp_path / "out"))
        manifest = result.manifest
        assert manifest is not None and manifest.levers == ("hugepages",) and manifest.sites == ()
        assert manifest.build_a == str(native_build.dir)
        gate = manifest.gate
        assert gate is not None and gate["passed"] and gate["tokens_a"] == gate["tokens_b"]
        assert gate["function_hits"]["amppatch_thp_wanted"] > 0  # the lever's code ran in B
        _assert_lever_measured(manifest)

        # THP `never` (simulated where the lever reads the mode): the same branch and build run the stock
        # mapping, compute the same tokens, and apply still succeeds
        never = tmp_path / "enabled"
        never.write_text("always madvise [never]\n")
        monkeypatch.setenv("AMPPATCH_THP_ENABLED_PATH", str(never))
        again = apply(ApplyOptions(repo=llama_repo, hugepages=True, out=tmp_path / "never"))
        assert (again.commit, again.builds) == (result.commit, result.builds) and again.reused
        assert again.manifest is not None and again.manifest.hugepages is not None
        pages = again.manifest.hugepages
        assert (pages["thp_enabled"], pages["status"]) == ("never", "thp-never")
        assert "the lever reported: THP is 'never' here" in pages["note"]  # it took the stock path itself
        assert again.gate is not None and again.gate["tokens_b"] == gate["tokens_b"] == again.gate["tokens_a"]
    finally:
        _cleanup(llama_repo, result.branch if result else None)
        assert _git(llama_repo, "rev-parse", "HEAD").strip() == head
        assert _git(llama_repo, "status", "--porcelain") == ""


def test_the_lever_with_the_q8_0_site_on_the_pinned_tree(llama_repo: Path, native_build, tiny_model_q8_0: Path,
                                                          tmp_path: Path) -> None:
    result = None
    try:
        result = apply(ApplyOptions(repo=llama_repo, sites=("ggml_vec_dot_q8_0_q8_0",), hugepages=True,
                                    gate_model=tiny_model_q8_0, out=tmp_path / "out"))
        manifest = result.manifest
        assert manifest is not None and manifest.levers == ("hugepages",)
        assert [s["key"] for s in manifest.sites] == ["ggml_vec_dot_q8_0_q8_0#0 x[ib]"]
        assert {f["path"] for f in manifest.files} == {"src/llama-mmap.cpp", "ggml/src/ggml-cpu/arch/x86/quants.c"}
        gate = manifest.gate
        assert gate is not None and gate["passed"] and gate["ppl_a"] == gate["ppl_b"]
        assert gate["function_hits"]["ggml_vec_dot_q8_0_q8_0"] > 0 and gate["function_hits"]["amppatch_thp_wanted"] > 0
        assert gate["kernel_test"]["status"] == "passed"
        _assert_lever_measured(manifest)
        assert result.patch_path is not None
        assert check_export(result.patch_path.read_text(), manifest.to_json()) == []
    finally:
        _cleanup(llama_repo, result.branch if result else None)
