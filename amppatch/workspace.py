"""llama.cpp source trees: fetched from the llama-cpp-python sdist (no network but the package index),
made into real git repositories, cached under the user's cache dir."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import AmppatchError, NetworkError, UsageError
from amppatch.paths import FileLock, cache_dir
from amppatch.proc import progress, require_tool, run

PINNED_VERSION = "0.3.36"
# The oldest llama.cpp amppatch is verified on end to end (fetch, build, apply with its gate): the tree
# llama-cpp-python of this version vendors. Older trees are refused where they lack what amppatch needs
# (too_old_error); the ones in between that have it are attempted, not verified.
OLDEST_SUPPORTED_VERSION = "0.3.9"
_FETCHED_MARKER = "amppatch-fetched"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
# Fixed identity and date make the import commit identical on every machine, so build keys (which
# contain the commit) are comparable across machines and CI runs.
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "amppatch",
    "GIT_AUTHOR_EMAIL": "amppatch@localhost",
    "GIT_COMMITTER_NAME": "amppatch",
    "GIT_COMMITTER_EMAIL": "amppatch@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}
# An extracted tree is ~180 MB and the archive ~75 MB; ask for comfortable headroom before starting.
_MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class FetchOptions:
    version: str = PINNED_VERSION
    dest: Path | None = None


def check_llama_tree(path: Path) -> Path:
    """Return the resolved root of a llama.cpp source tree, or raise a UsageError that says what to pass."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UsageError(
            f"{root} does not exist",
            next_step="pass the root of a llama.cpp checkout, or run `amppatch llama fetch` and use the path it prints",
        )
    if not root.is_dir():
        raise UsageError(
            f"{root} is not a directory", next_step="pass the root directory of a llama.cpp checkout"
        )
    root = root.resolve()
    missing = [p for p in ("CMakeLists.txt", "include/llama.h", "ggml/src") if not (root / p).exists()]
    if missing:
        raise UsageError(
            f"{root} is not a llama.cpp source tree (missing {', '.join(missing)})",
            next_step="pass the top directory of llama.cpp (the one with CMakeLists.txt and include/llama.h), "
            "or run `amppatch llama fetch`",
        )
    if not cpu_backend_dir(root).is_dir():
        # llama.cpp before late 2024 kept the CPU kernels in ggml/src/ggml.c and friends
        raise too_old_error(describe_tree(root), "it has no ggml/src/ggml-cpu directory (the CPU backend's "
                            "own directory, where amppatch finds the kernels)")
    return root


def too_old_error(tree: str, missing: str) -> UsageError:
    """The one error for a llama.cpp older than amppatch supports: the tree, what it lacks, and the oldest
    supported version."""
    return UsageError(
        f"{tree} is older than amppatch supports: {missing}; the oldest supported llama.cpp is the one "
        f"llama-cpp-python {OLDEST_SUPPORTED_VERSION} vendors",
        next_step="update the checkout to a newer llama.cpp, or use a supported tree (`amppatch llama fetch` "
        f"for the pinned one, `amppatch llama fetch --version {OLDEST_SUPPORTED_VERSION}` for the oldest)",
    )


def describe_tree(root: Path, commit: str | None = None) -> str:
    """A tree as an error names it: its path, and which llama.cpp it is — the llama-cpp-python version a
    fetched tree came from, else its commit (given, or read from .git without running git)."""
    root = Path(root)
    marker = root / ".git" / _FETCHED_MARKER
    try:
        fetched = marker.read_text().strip() if marker.is_file() else ""
    except OSError:
        fetched = ""
    if fetched:
        return f"{root} ({fetched.replace('==', ' ')}'s llama.cpp)"
    commit = commit or _head_commit(root)
    return f"{root} (commit {commit[:12]})" if commit else str(root)


def _head_commit(root: Path) -> str | None:
    """HEAD's commit from a plain .git directory (detached, a loose ref or a packed one); None otherwise."""
    git_dir = root / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if re.fullmatch(r"[0-9a-f]{40,64}", head) else None
        ref = head[5:].strip()
        if (git_dir / ref).is_file():
            return (git_dir / ref).read_text().strip() or None
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else ():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        return None
    return None


def cpu_backend_dir(repo: Path) -> Path:
    """The ggml CPU backend sources (layouts inside it differ between versions; callers search it)."""
    return Path(repo) / "ggml" / "src" / "ggml-cpu"


def _archive_path(version: str) -> Path:
    return cache_dir("sources") / f"llama_cpp_python-{version}.tar.gz"


def _tree_path(version: str) -> Path:
    return cache_dir("trees") / f"llama.cpp-{version}"


def _is_complete_tree(tree: Path) -> bool:
    return (tree / ".git" / _FETCHED_MARKER).is_file()


def _check_free_space(where: Path) -> None:
    free = shutil.disk_usage(where).free
    if free < _MIN_FREE_BYTES:
        raise AmppatchError(
            f"only {free >> 20} MiB free in {where}; fetching llama.cpp needs about 1 GiB",
            next_step="free disk space (`amppatch clean` shows what amppatch keeps), or set AMPPATCH_CACHE_DIR "
            "to a larger disk",
        )


def _download_archive(version: str) -> Path:
    archive = _archive_path(version)
    if archive.is_file():
        return archive
    _check_free_space(archive.parent)
    progress(f"downloading llama-cpp-python {version} source distribution (~75 MB) ...")
    with tempfile.TemporaryDirectory(dir=archive.parent) as tmp:
        done = run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                tmp,
            ],
            check=False,
            timeout=1800,
        )
        if done.returncode != 0:
            output = done.stderr + done.stdout
            if "No matching distribution" in output or "from versions:" in output:
                raise UsageError(
                    f"llama-cpp-python {version} does not exist on the package index",
                    next_step=f"pick a published version (`pip index versions llama-cpp-python`); "
                    f"the pinned default is {PINNED_VERSION}",
                )
            raise NetworkError(
                f"could not download llama-cpp-python {version} and no copy is cached",
                next_step="connect to the package index (PyPI) once, or put the sdist at "
                f"{archive} by hand; pip said: {output.strip().splitlines()[-1] if output.strip() else '?'}",
            )
        found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise NetworkError(
                f"pip downloaded no source archive for llama-cpp-python {version}",
                next_step="check that pip can reach the package index",
            )
        shutil.move(str(found[0]), archive)
    return archive


def _extract_tree(archive: Path, version: str, tree: Path) -> None:
    _check_free_space(tree.parent)
    progress(f"extracting vendor/llama.cpp from {archive.name} ...")
    staging = Path(tempfile.mkdtemp(prefix=f".{tree.name}-", dir=tree.parent))
    try:
        with tarfile.open(archive) as tar:
            marker = "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if marker in m.name + "/" and m.name.count("/") >= 2]
            members = [m for m in members if m.name.split("/", 1)[1].startswith("vendor/llama.cpp")]
            if not any(m.name.endswith("vendor/llama.cpp/CMakeLists.txt") for m in members):
                raise UsageError(
                    f"{archive.name} has no vendor/llama.cpp tree",
                    next_step=f"use a llama-cpp-python version that vendors llama.cpp (e.g. {PINNED_VERSION}); "
                    f"delete {archive} if it is corrupt",
                )
            tar.extractall(staging, members=members, filter="data")
        top = next(staging.iterdir())
        src = top / "vendor" / "llama.cpp"
        # The sdist carries the submodule's `.git` pointer file; a real repository replaces it.
        git_pointer = src / ".git"
        if git_pointer.is_file():
            git_pointer.unlink()
        _init_repo(src, version)
        if tree.exists():
            shutil.rmtree(tree)
        src.rename(tree)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise AmppatchError(
                "the disk filled up while extracting llama.cpp",
                next_step="free disk space and run the command again",
            ) from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _init_repo(src: Path, version: str) -> None:
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    env = {**os.environ, **_GIT_IDENTITY}
    run([git, "init", "-q", "-b", "main", str(src)], env=env)
    # -f: the sdist is the tree; llama.cpp's own .gitignore must not drop files it shipped.
    run([git, "-C", str(src), "add", "-A", "-f"], env=env)
    run(
        [
            git,
            "-C",
            str(src),
            "commit",
            "-q",
            "--no-gpg-sign",
            "-m",
            f"llama.cpp from llama-cpp-python {version} (vendor/llama.cpp)",
        ],
        env=env,
    )
    (src / ".git" / _FETCHED_MARKER).write_text(f"llama-cpp-python=={version}\n")


def fetch_llama(options: FetchOptions) -> Path:
    """Make llama.cpp's source (from llama-cpp-python's sdist) available as a git repository; return its path.

    Cached: the second call returns at once. With `dest`, a clone of the cached repository is made there.
    """
    version = options.version
    if not _VERSION_RE.match(version):
        raise UsageError(
            f"{version!r} is not a version number",
            next_step=f"use a version like {PINNED_VERSION} (`pip index versions llama-cpp-python`)",
        )
    tree = _tree_path(version)
    with FileLock(tree.parent / f".{tree.name}.lock"):
        if not _is_complete_tree(tree):
            archive = _download_archive(version)
            _extract_tree(archive, version, tree)
    check_llama_tree(tree)  # a tree too old to use is refused here, not at the first build
    if _version_tuple(version) < _version_tuple(OLDEST_SUPPORTED_VERSION):
        progress(f"note: llama-cpp-python {version} is older than the oldest version amppatch is verified on "
                 f"({OLDEST_SUPPORTED_VERSION}); its tree has what amppatch looks for, so it is used as is")
    if options.dest is None:
        return tree
    return _clone_to(tree, Path(options.dest).expanduser())


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _clone_to(tree: Path, dest: Path) -> Path:
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        check_llama_tree(dest)  # an existing llama.cpp checkout there is accepted as is
        return dest
    parent = dest.parent
    if not parent.exists() or not os.access(parent, os.W_OK):
        raise UsageError(
            f"cannot create {dest}: {parent} is missing or not writable",
            next_step="choose a --dest in a writable directory",
        )
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    run([git, "clone", "-q", str(tree), str(dest)], what="git clone")
    return dest
