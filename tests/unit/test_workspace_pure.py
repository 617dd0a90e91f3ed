from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.paths import cache_dir, cache_root
from amppatch.workspace import FetchOptions, check_llama_tree, fetch_llama


def test_nonexistent_repo(tmp_path: Path):
    with pytest.raises(UsageError, match="does not exist") as info:
        check_llama_tree(tmp_path / "nope")
    assert info.value.next_step


def test_directory_that_is_not_llama_cpp(tmp_path: Path):
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    with pytest.raises(UsageError, match=r"not a llama\.cpp source tree"):
        check_llama_tree(tmp_path)


def test_minimal_llama_layout_is_accepted(tmp_path: Path):
    for d in ("include", "ggml/src/ggml-cpu"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text("")
    (tmp_path / "include" / "llama.h").write_text("")
    assert check_llama_tree(tmp_path) == tmp_path.resolve()


@pytest.mark.parametrize("version", ["latest", "0.3", "v0.3.36", "0.3.36; rm -rf /"])
def test_bad_version_strings_are_refused_before_any_download(version: str, tmp_path, monkeypatch):
    monkeypatch.setenv("AMPPATCH_CACHE_DIR", str(tmp_path))
    with pytest.raises(UsageError, match="not a version number"):
        fetch_llama(FetchOptions(version=version))
    assert not any((tmp_path / "sources").glob("*"))


def test_cache_root_follows_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("AMPPATCH_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == (tmp_path / "c").resolve()
    monkeypatch.delenv("AMPPATCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == (tmp_path / "x" / "amppatch").resolve()
    assert cache_dir("models").is_dir()
    with pytest.raises(ValueError):
        cache_dir("nonsense")
