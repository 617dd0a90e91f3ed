"""The typed apply manifest: every committed `patches/*.json` reads and writes back byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.patch.manifest import ApplyManifest

PATCHES = sorted((Path(__file__).resolve().parents[2] / "patches").glob("*.json"))


@pytest.mark.parametrize("path", PATCHES, ids=lambda p: p.name)
def test_committed_manifest_round_trips(path: Path) -> None:
    text = path.read_text()
    doc = json.loads(text)
    manifest = ApplyManifest.from_json(doc)
    assert json.dumps(manifest.to_json(), indent=2, default=str) + "\n" == text
    assert manifest.to_json() == doc and list(manifest.to_json()) == list(doc)
    read = ApplyManifest.read(path)
    assert read.path == path and read.dumps() == text
    assert "path" not in read.to_json()


def test_committed_manifests_exist() -> None:
    assert PATCHES


def test_typed_fields() -> None:
    manifest = ApplyManifest.read(PATCHES[0])
    doc = json.loads(PATCHES[0].read_text())
    assert manifest.commit == doc["commit"] and manifest.branch == doc["branch"]
    assert manifest.build_a == doc["builds"]["a"] and manifest.build_b == doc["builds"]["b"]
    assert list(manifest.sites) == doc["sites"]


def test_missing_keys_stay_absent() -> None:
    doc = {"schema_version": 1, "sites": [], "tunable": True}
    assert ApplyManifest.from_json(doc).to_json() == doc


def test_checked_by_the_shared_checker(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lacks `sites"):
        ApplyManifest.from_json({"schema_version": 1}, tmp_path / "x.json")
