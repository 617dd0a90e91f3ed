"""The bench's page arms get their source from `bench.levers.lever_branch`: one commit holding the huge-page
lever on top of a base (stock's HEAD, or the amppatch arm's branch), made without touching the checkout,
and the same branch again on the next bench."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root holds bench/

from amppatch.errors import UsageError
from amppatch.pages import MARKER
from amppatch.proc import run
from bench.levers import LEVER_BRANCH_PREFIX, lever_branch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures_pages" / "llama-mmap.cpp"
_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
             "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo: Path, *args: str) -> str:
    return run(["git", "-C", str(repo), *args], env={**os.environ, **_IDENTITY}).stdout


@pytest.fixture()
def mmap_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    shutil.copy(FIXTURE, repo / "src" / "llama-mmap.cpp")
    (repo / "src" / "kernel.c").write_text("int k(void) { return 1; }\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    return repo


def test_lever_branch_holds_the_lever_on_its_base_and_is_reused(mmap_repo: Path) -> None:
    head = _git(mmap_repo, "rev-parse", "HEAD").strip()
    before = (mmap_repo / "src" / "llama-mmap.cpp").read_bytes()
    branch = lever_branch(mmap_repo)
    assert branch.startswith(LEVER_BRANCH_PREFIX)
    assert _git(mmap_repo, "rev-parse", f"{branch}^").strip() == head
    assert _git(mmap_repo, "diff", "--name-only", head, branch).split() == ["src/llama-mmap.cpp"]
    assert MARKER in _git(mmap_repo, "show", f"{branch}:src/llama-mmap.cpp")
    # the checkout is untouched: same HEAD, same file, nothing to commit
    assert _git(mmap_repo, "rev-parse", "HEAD").strip() == head
    assert (mmap_repo / "src" / "llama-mmap.cpp").read_bytes() == before
    assert _git(mmap_repo, "status", "--porcelain") == ""
    tip = _git(mmap_repo, "rev-parse", branch).strip()
    assert lever_branch(mmap_repo) == branch and _git(mmap_repo, "rev-parse", branch).strip() == tip


def test_lever_goes_on_top_of_another_branch_that_leaves_the_mapping_alone(mmap_repo: Path) -> None:
    _git(mmap_repo, "checkout", "-q", "-b", "amppatch/fx")
    (mmap_repo / "src" / "kernel.c").write_text("int k(void) { __builtin_prefetch(0); return 1; }\n")
    _git(mmap_repo, "commit", "-qam", "prefetch")
    patched = _git(mmap_repo, "rev-parse", "HEAD").strip()
    _git(mmap_repo, "checkout", "-q", "main")
    branch = lever_branch(mmap_repo, "amppatch/fx")
    assert _git(mmap_repo, "rev-parse", f"{branch}^").strip() == patched
    assert "__builtin_prefetch" in _git(mmap_repo, "show", f"{branch}:src/kernel.c")
    assert branch != lever_branch(mmap_repo)  # stock's lever branch is another commit


def test_lever_refuses_a_base_that_changed_the_mapping_or_a_dirty_file(mmap_repo: Path) -> None:
    _git(mmap_repo, "checkout", "-q", "-b", "other")
    with (mmap_repo / "src" / "llama-mmap.cpp").open("a") as f:
        f.write("// changed\n")
    _git(mmap_repo, "commit", "-qam", "changed mapping")
    _git(mmap_repo, "checkout", "-q", "main")
    with pytest.raises(UsageError, match="differs from the checkout"):
        lever_branch(mmap_repo, "other")
    with pytest.raises(UsageError, match="not a branch"):
        lever_branch(mmap_repo, "nope")
    with (mmap_repo / "src" / "llama-mmap.cpp").open("a") as f:
        f.write("// uncommitted\n")
    with pytest.raises(UsageError, match="uncommitted"):
        lever_branch(mmap_repo)
