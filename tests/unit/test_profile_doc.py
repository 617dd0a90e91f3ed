"""The typed profile: the committed profile.json reads and writes back byte for byte, and apply takes its
typed sites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.patch import DEFAULT_DISTANCE, DEFAULT_HINT, sites_from_profile
from amppatch.patch.plan import requests_from_profile_sites
from amppatch.profiledoc import Profile, ProfileSite

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "docs" / "runs").glob("*/profile.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.parent.name)
def test_committed_profile_round_trips(path: Path) -> None:
    text = path.read_text()
    doc = json.loads(text)
    profile = Profile.from_json(doc)
    assert json.dumps(profile.to_json(), indent=2, default=str) == text
    assert list(profile.to_json()) == list(doc)
    read = Profile.read(path)
    assert read.path == path and read.dumps() == text and "path" not in read.to_json()
    for site, raw in zip(read.sites, doc["sites"], strict=True):
        assert (site.function, site.loop, site.stream, site.distance_bytes, site.hint, site.inputs) == (
            raw["function"], raw["loop"], raw["stream"], raw["distance_bytes"], raw["hint"], raw["inputs"])
        assert list(site.to_json()) == list(raw)


def test_committed_profiles_exist() -> None:
    assert PROFILES


def test_sites_from_profile_reads_through_the_type(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"schema_version": 1, "machine": {"cpu_model": "x"}, "sites": [
        {"function": "f", "loop": 1, "stream": "x", "distance_bytes": 1024, "hint": 0, "inputs": {"a": 1}},
        {"function": "g"}]}))
    requests, profile = sites_from_profile(path, None, None)
    assert isinstance(profile, Profile) and profile.cpu_model == "x" and profile.path == path
    assert [(r.function, r.distance_bytes, r.hint, r.origin) for r in requests] == [
        ("f", 1024, 0, "profile"), ("g", DEFAULT_DISTANCE, DEFAULT_HINT, "profile")]
    assert requests[0].inputs == {"a": 1}
    over = requests_from_profile_sites(profile.sites, 512, 3)
    assert [(r.distance_bytes, r.hint) for r in over] == [(512, 3), (512, 3)]


def test_a_site_with_a_null_distance_is_refused() -> None:
    site = ProfileSite.from_json({"function": "f", "distance_bytes": None})
    with pytest.raises(UsageError, match="distance None"):
        requests_from_profile_sites([site], None, None)


def test_checked_by_the_shared_checker(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lacks `sites"):
        Profile.from_json({"schema_version": 1}, tmp_path / "p.json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"schema_version": 1, "sites": []}))
    with pytest.raises(UsageError, match="lists no sites"):
        sites_from_profile(empty, None, None)


def test_roofline_and_huge_pages_are_typed_and_summarized(tmp_path: Path) -> None:
    from amppatch.hugepages import HugeShare
    from amppatch.limit import KernelPick, KernelRun, MeasuredKernel, SettingRates
    from amppatch.profile.document import write_document
    from amppatch.roofline import Rate, RooflineResult
    from amppatch.weightpages import WeightPages

    result = RooflineResult("q8_0", 2048, 1, "CPU", "vec_dot (ggml_vec_dot_<type>_*)",
                            Rate(1 << 20, 100, (9.0, 10.0, 11.0), (1.0,) * 3),
                            Rate(600 << 20, 6000, (4.0, 4.1, 4.2), (1.0,) * 3), 14.2, "/b", "k")
    run = KernelRun((MeasuredKernel(KernelPick("q8_0", 2048, 10**9, 1.0, 0.8), 1, result),),
                    ({"threads": 1, "thp": 0, "gbps": 14.2},), "madvise", "/b")
    part = run.assemble([SettingRates("t1", "1 thread", 1, (("profiled", 5.0),))])
    pages = WeightPages.watched(HugeShare(1 << 30, 1 << 30, 0, 0, 1, True), 1 << 30, "the profiled run")
    doc = {"schema_version": 1, "sites": [], "huge_pages": pages.to_json(), "roofline": part.to_json()}
    written = write_document(tmp_path / "profile.json", doc)
    assert written.profile.roofline == part and written.profile.huge_pages == pages
    assert Profile.read(tmp_path / "profile.json").to_json() == doc
    lines = written.summary.splitlines()
    assert "weights on huge pages: 0% of the 1.07 GB mapping of the model file on huge pages, during the profiled " \
           "run" in lines
    assert ("1 thread: roofline 10.00 GB/s (kernel binds: in cache 10.00, stream 14.20 on 4 KiB / — on huge pages); "
            "profiled 5.00 GB/s (50%)") in lines
    assert any(line.startswith("  - q8_0 at width 2048") for line in lines)
    old = Profile.from_json({"schema_version": 1, "sites": []})
    assert old.roofline is None and old.huge_pages is None


def test_a_moe_profile_names_the_products_behind_each_kernel(tmp_path: Path) -> None:
    from amppatch.profile.document import write_document

    doc = {"schema_version": 1, "sites": [], "tokens": {"count": 4, "p50_ms": 100.0, "p99_ms": 120.0},
           "bytes_per_token": {"weights": 662_000_000, "n_expert": 8, "n_expert_used": 2,
                               "experts_read": 488_000_000},
           "hot_functions": [{"name": "ggml_gemv_q4_K_8x8_q8_K", "share": 0.56,
                              "ops": {"type": "q4_k", "mul_mat_bytes": 1, "mul_mat_id_bytes": 3,
                                      "mul_mat_id_share": 0.75}}]}
    lines = write_document(tmp_path / "profile.json", doc).summary.splitlines()
    assert "weights read per token: 662.0 MB (experts: 2 of 8 routed per token, 488.0 MB of them through " \
           "mul_mat_id)" in lines
    assert "   56.0%  ggml_gemv_q4_K_8x8_q8_K  [mul_mat_id 75 % · mul_mat 25 % of the q4_k bytes]" in lines
