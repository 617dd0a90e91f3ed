"""The huge-page lever inside `apply` (pure): request id, commit message, the export check of a lever's lines,
the manifest's `levers`/`hugepages`, and the stage's choice of what to patch — on our own stand-in for
llama.cpp's weight mapping and on the pairs apply generated for the pinned tree (patches/)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.pages import hugepages_lever
from amppatch.patch import ApplyManifest, ApplyOptions, check_export, commit_message, request_id
from amppatch.patch.levers import LeverEdit, lever_of
from amppatch.patch.stage import _levers, _resolve_requests

PATCHES = Path(__file__).resolve().parents[2] / "patches"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures_pages" / "llama-mmap.cpp"
BASE = "a" * 40


@pytest.fixture()
def lever(tmp_path: Path) -> LeverEdit:
    (tmp_path / "src").mkdir()
    shutil.copy(FIXTURE, tmp_path / "src" / "llama-mmap.cpp")
    edit = hugepages_lever(tmp_path)
    assert edit is not None
    return edit


def _pair(stem: str) -> tuple[str, dict]:
    return (PATCHES / f"{stem}.patch").read_text(), json.loads((PATCHES / f"{stem}.json").read_text())


def test_the_request_id_covers_the_lever_its_placement_and_its_templates(lever: LeverEdit,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    without = request_id(BASE, [], tunable=False, line_size=64)
    with_lever = request_id(BASE, [], tunable=False, line_size=64, levers=[lever])
    assert with_lever != without
    assert request_id(BASE, [], tunable=False, line_size=64, levers=[lever]) == with_lever  # stable
    moved = dataclasses.replace(lever, where={**lever.where, "line": lever.where["line"] + 1})
    assert request_id(BASE, [], tunable=False, line_size=64, levers=[moved]) != with_lever
    # other lever templates render other code: a branch made with the old ones is never reused
    monkeypatch.setattr("amppatch.patch.gitrepo.lever_templates_digest", lambda names: "0" * 16)
    assert request_id(BASE, [], tunable=False, line_size=64, levers=[lever]) != with_lever
    assert request_id(BASE, [], tunable=False, line_size=64) == without  # ... and prefetch ids stay as they were


def test_the_commit_message_gives_the_lever_one_line(lever: LeverEdit) -> None:
    alone = commit_message("0123456789ab", BASE, [], tunable=False, levers=[lever]).splitlines()
    assert alone[0] == "amppatch: hugepages lever [0123456789ab]"
    assert [ln for ln in alone if ln.startswith("Lever: ")] == [
        "Lever: hugepages (src/llama-mmap.cpp:52): the mmapped weights on file-backed transparent huge pages "
        "(AMPPATCH_HUGEPAGES=0 or THP 'never': the stock mapping)"]
    assert not any(ln.startswith("- ") for ln in alone)  # the message's site lines are "- KEY (...)"
    subject = commit_message("x", BASE, [], tunable=False).splitlines()[0]
    assert subject == "amppatch: software prefetch at 0 site(s) [x]"  # without a lever: as it always was


def test_only_lever_markers_count_as_lever_lines() -> None:
    assert lever_of("#endif /* amppatch: hugepages */") == "hugepages"
    assert lever_of("    } else /* amppatch: hugepages: otherwise the stock mapping */") == "hugepages"
    assert lever_of('LLAMA_LOG_WARN("amppatch: huge pages: ...")') is None
    assert lever_of("__builtin_prefetch(p, 0, 3); /* amppatch: hugepages_x#0 p d=64 h=3 */") is None


@pytest.mark.parametrize("stem", ["hugepages", "ggml_vec_dot_q8_0_q8_0.hugepages"])
def test_an_exported_lever_pair_is_consistent_and_reads_back(stem: str) -> None:
    text, manifest = _pair(stem)
    assert check_export(text, manifest) == []
    typed = ApplyManifest.from_json(manifest)
    assert typed.levers == ("hugepages",) and typed.to_json() == manifest
    assert typed.hugepages is not None and typed.hugepages["status"] == "verified"
    assert typed.hugepages["share_b"] >= 0.5


@pytest.mark.parametrize(("doctor", "says"), [
    (lambda t, m: (t, {**m, "levers": []}), "the manifest lists no such lever"),
    (lambda t, m: (t.replace("MADV_HUGEPAGE) != 0", "MADV_NOHUGEPAGE) != 0"), m), "added_sha256 differs"),
    (lambda t, m: (t.replace("\nLever: hugepages", "\nLever: hugepagez"), m), "commit message names lever(s)"),
    (lambda t, m: (t.replace("+        if (amppatch_thp_wanted()) { /* amppatch: hugepages */",
                             "+        if (amppatch_thp_wanted()) { /* amppatch: tuned */"), m), "added_sha256"),
    (lambda t, m: (t, {**m, "levers": ["hugepages", "hugetlb"]}), "unknown lever(s) ['hugetlb']"),
    (lambda t, m: (t.replace("Lever: hugepages (src/llama-mmap.cpp:", "Lever: hugepages (src/llama.cpp:"), m),
     "does not place lever hugepages in src/llama-mmap.cpp"),
])
def test_a_doctored_lever_patch_or_manifest_is_refused(doctor: Callable[[str, dict], tuple[str, dict]],
                                                       says: str) -> None:
    text, manifest = _pair("ggml_vec_dot_q8_0_q8_0.hugepages")
    bad_text, bad_manifest = doctor(text, copy.deepcopy(manifest))
    assert (bad_text, bad_manifest) != (text, manifest)
    problems = check_export(bad_text, bad_manifest)
    assert problems and says in "; ".join(problems), problems


def test_a_lever_file_entry_the_levers_do_not_list_is_refused() -> None:
    text, manifest = _pair("hugepages")
    doctored = copy.deepcopy(manifest)
    doctored["files"][0]["lever"] = "other"
    assert any("belongs to lever other" in p for p in check_export(text, doctored))


def test_old_manifests_without_lever_keys_read_as_none() -> None:
    doc = json.loads((PATCHES / "ggml_vec_dot_q8_0_q8_0.json").read_text())
    assert "levers" not in doc and "hugepages" not in doc
    manifest = ApplyManifest.from_json(doc)
    assert (manifest.levers, manifest.hugepages) == ((), None)
    assert "levers" not in manifest.to_json() and manifest.to_json() == doc
    with pytest.raises(UsageError, match="`levers` must be a list"):
        ApplyManifest.from_json({**doc, "levers": "hugepages"})


def test_the_lever_alone_is_a_request_and_site_knobs_without_sites_are_refused(tmp_path: Path) -> None:
    assert _resolve_requests(ApplyOptions(repo=tmp_path, hugepages=True)) == ([], [])
    with pytest.raises(UsageError, match="no sites given"):
        _resolve_requests(ApplyOptions(repo=tmp_path))
    with pytest.raises(UsageError, match="--hugepages alone has none"):
        _resolve_requests(ApplyOptions(repo=tmp_path, hugepages=True, distance=4096))
    requests, _ = _resolve_requests(ApplyOptions(repo=tmp_path, hugepages=True, sites=("f",)))
    assert [r.function for r in requests] == ["f"]


def test_apply_twice_leaves_the_lever_alone(lever: LeverEdit, tmp_path: Path) -> None:
    options = ApplyOptions(repo=tmp_path, hugepages=True)
    warnings: list[str] = []
    (first,) = _levers(options, tmp_path, warnings)
    assert first.change.after == lever.change.after and warnings == []
    (tmp_path / first.change.relpath).write_bytes(first.change.after)
    assert _levers(options, tmp_path, warnings) == []
    assert warnings == ["hugepages: the tree already carries the huge-page lever; unchanged"]
    assert _levers(ApplyOptions(repo=tmp_path), tmp_path, []) == []  # off unless asked for
