"""The file-backed huge-page lever as the bench races it: a branch holding a base commit (stock's HEAD or the
amppatch arm's branch) plus `amppatch.pages`' edit of llama.cpp's weight mapping, and the share of the model
file each page arm's build really mapped on huge pages, measured after its run (`pages.measure_share`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amppatch.errors import AmppatchError, UsageError
from amppatch.proc import progress

if TYPE_CHECKING:
    from amppatch.build import Build

# `amppatch clean --repo` removes amppatch/* branches, these included; the suffix is the commit's id, so a
# branch of this name holds exactly this commit unless someone moved it.
LEVER_BRANCH_PREFIX = "amppatch/bench-pages-"
SHARE_TOKENS = 4  # the share is read once the weights are loaded; a few tokens keep the process alive for it


def lever_message(base: str, relpath: str) -> str:
    return (f"amppatch: file-backed huge pages for the mmapped weights ({relpath})\n\n"
            f"The huge-page lever of amppatch/pages.py, for the bench's page arms.\n\nBase: {base}\n")


def lever_branch(repo: Path, base_ref: str | None = None) -> str:
    """The branch holding `base_ref` (a branch of `repo`; None: HEAD) plus the huge-page lever: one
    deterministic commit, made without touching the checkout, reused when the branch already holds it.

    The edit is planned on the checkout's file, so the base must hold that file unchanged (the amppatch
    branch patches ggml's kernels, never the mapping)."""
    from amppatch.pages import hugepages_change
    from amppatch.patch.gitrepo import GitRepo

    git = GitRepo(repo)
    change = hugepages_change(repo)
    if change is None:
        raise UsageError(f"{repo} already carries the huge-page lever, so stock would carry it too",
                         next_step="run the bench on a tree without it (`amppatch llama fetch`)")
    if change.relpath in git.dirty_files():
        raise UsageError(f"{repo}: {change.relpath} has uncommitted changes (the stock build would hold them, "
                         "the lever's branch not)", next_step="commit or revert them first")
    base = git.head_commit() if base_ref is None else git.branch_commit(base_ref)
    if base is None:
        raise UsageError(f"{base_ref!r} is not a branch of {repo}", next_step="check `git branch`")
    try:
        at_base = git.repo.commit(base).tree[change.relpath].data_stream.read()
    except KeyError:
        at_base = None
    if at_base != change.before:
        raise UsageError(f"{change.relpath} at {base[:12]} differs from the checkout's, where the lever was planned",
                         next_step="the page arms need a base that leaves llama.cpp's weight mapping as it is")
    commit = git.make_commit(base, {change.relpath: change.after}, lever_message(base, change.relpath))
    branch = LEVER_BRANCH_PREFIX + commit[:12]
    existing = git.branch_commit(branch)
    if existing is None:
        git.create_branch(branch, commit)
        progress(f"bench: committed the huge-page lever on {branch} (base {base[:12]})")
    elif existing != commit:
        raise UsageError(f"branch {branch} exists but does not hold the lever's commit {commit[:12]}",
                         next_step=f"remove it (`git -C {repo} branch -D {branch}`) and run the bench again")
    return branch


def measure_page_shares(builds: Mapping[str, Build], model: Path, *, bench_args: Mapping[str, Sequence[str]],
                        env: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, Any]]:
    """Per arm: how much of the model file its build mapped on huge pages once loaded (HugeShare as JSON),
    or why that could not be measured. In the order given: the page cache is shared, so an earlier arm's run
    (the lever leaves large folios behind) shapes what a later one finds."""
    from amppatch.pages import measure_share

    out: dict[str, dict[str, Any]] = {}
    for arm, build in builds.items():
        try:
            share, log = measure_share(build, model, tokens=SHARE_TOKENS, bench_args=tuple(bench_args.get(arm, ())),
                                       env=env.get(arm))
        except AmppatchError as exc:
            out[arm] = {"error": exc.message}
            progress(f"bench: huge-page share of {arm} not measured: {exc.message}")
            continue
        out[arm] = {**share.to_json(), "lever_log": log}
        progress(f"bench: {arm}: {share.share:.1%} of the model file on huge pages")
    return out
