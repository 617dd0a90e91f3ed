"""The exported .patch / .json pair must agree (pure): the checker on the example pairs apply generated
for the pinned tree (patches/), and on doctored copies of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from amppatch.patch import check_export, parse_format_patch

PATCHES = Path(__file__).resolve().parents[2] / "patches"
PAIRS = sorted(p.stem for p in PATCHES.glob("*.json"))


def _pair(stem: str) -> tuple[str, dict]:
    return (PATCHES / f"{stem}.patch").read_text(), json.loads((PATCHES / f"{stem}.json").read_text())


def test_the_example_pairs_exist() -> None:
    # the pairs below are this test's good inputs: losing them would silently test nothing
    assert {"ggml_vec_dot_q8_0_q8_0.tuned", "ggml_vec_dot_q8_0_q8_0.tunable",
            "part-two.gemv_q4_0.gemv_q4_K.flash_attn_k"} <= set(PAIRS)


@pytest.mark.parametrize("stem", PAIRS)
def test_every_generated_pair_is_consistent(stem: str) -> None:
    assert check_export(*_pair(stem)) == []


def test_parser_reads_commit_files_and_added_line_numbers() -> None:
    text, manifest = _pair("part-two.gemv_q4_0.gemv_q4_K.flash_attn_k")
    patch = parse_format_patch(text)
    assert patch.commit == manifest["commit"] and f"[{manifest['id']}]" in patch.subject
    assert [f.path for f in patch.files] == [f["path"] for f in manifest["files"]]
    for pf, claimed in zip(patch.files, manifest["files"], strict=True):
        assert sorted(pf.added) == claimed["inserted_lines"] and pf.removed == 0


def _doctored_manifest(manifest: dict, change: str) -> dict:
    m = copy.deepcopy(manifest)
    if change == "distance":
        m["sites"][0]["distance_bytes"] = 4096
    elif change == "hint":
        m["sites"][0]["hint"] = 0
    elif change == "base":
        m["base_commit"] = "0" * 40
    elif change == "commit":
        m["commit"] = "1" * 40
    elif change == "lines":
        m["files"][0]["inserted_lines"] = [n + 1 for n in m["files"][0]["inserted_lines"]]
    elif change == "extra file":
        m["files"].append({"path": "ggml/src/ggml-cpu/ops.cpp", "inserted_lines": [10]})
    elif change == "extra site":
        m["sites"].append({**m["sites"][0], "key": "ggml_vec_dot_q8_0_q8_0#1 y[ib]"})
    elif change == "id":
        m["id"] = "000000000000"
    return m


@pytest.mark.parametrize(("change", "says"), [
    ("distance", "distance"), ("hint", "hint"), ("base", "base"), ("commit", "commit"),
    ("lines", "adds lines 1331-1333, the manifest says 1332-1334"), ("extra file", "ops.cpp"),
    ("extra site", "#1 y[ib]"), ("id", "does not name request"),
])
def test_a_doctored_manifest_is_caught(change: str, says: str) -> None:
    text, manifest = _pair("ggml_vec_dot_q8_0_q8_0.tuned")
    problems = check_export(text, _doctored_manifest(manifest, change))
    assert problems and says in "; ".join(problems), problems


def test_a_doctored_patch_is_caught() -> None:
    text, manifest = _pair("ggml_vec_dot_q8_0_q8_0.tuned")
    # the prefetch distance changed in the code only (an amended branch), the message still says 11264
    code = text.replace("+ 11264, 0, 3); /* amppatch: ggml_vec_dot_q8_0_q8_0#0 x[ib] d=11264",
                        "+ 4096, 0, 3); /* amppatch: ggml_vec_dot_q8_0_q8_0#0 x[ib] d=4096")
    assert code != text
    assert any("distance [4096]" in p for p in check_export(code, manifest))
    # ... or in the commit message only
    message = text.replace("constant distance=11264 B", "constant distance=4096 B")
    assert message != text
    assert any("commit message" in p for p in check_export(message, manifest))
    # a prefetch line for a site the manifest does not list
    hunk = "@@ -1328,6 +1328,9 @@"
    assert hunk in text
    stray = "+        __builtin_prefetch((const char *)(&y[ib]) + 64, 0, 0); /* amppatch: other#0 y[ib] d=64 h=0 */\n"
    extra = text.replace(hunk, "@@ -1328,6 +1328,10 @@").replace("+        #endif", stray + "+        #endif", 1)
    assert extra.count("amppatch: other#0") == 1
    assert any("site the manifest does not list" in p for p in check_export(extra, manifest))
    # another request's patch under this manifest (what a branch reset or replaced would export)
    other, _ = _pair("ggml_vec_dot_q4_0_q8_0")
    problems = check_export(other, manifest)
    assert any("commit" in p for p in problems) and any("no line for site" in p for p in problems)


def test_a_doctored_tunable_default_is_caught() -> None:
    text, manifest = _pair("ggml_vec_dot_q8_0_q8_0.tunable")
    call = 'amppatch_env_long("AMPPATCH_GGML_VEC_DOT_Q8_0_Q8_0_L0_X_DISTANCE", 2048)'
    assert call in text
    problems = check_export(text.replace(call, call.replace("2048", "8192")), manifest)
    assert any("tunables header does not default" in p for p in problems), problems
    renamed = text.replace("/* ggml_vec_dot_q8_0_q8_0#0 x[ib]: 1 line(s)", "/* other#0 x: 1 line(s)")
    assert renamed != text
    assert any("tunables header defines sites" in p for p in check_export(renamed, manifest))
