"""learned.json is read and written only through `Learned`: the committed tune results round-trip byte for
byte, and a document without the keys its readers use is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amppatch.errors import UsageError
from amppatch.learned import Learned, Winner

ROOT = Path(__file__).resolve().parents[2]


def test_committed_learned_files_round_trip_byte_for_byte() -> None:
    files = sorted(ROOT.glob("bench/learned/*.json"))
    assert files
    for path in files:
        text = path.read_text()
        doc = json.loads(text)
        learned = Learned.read(path)
        assert learned.path == path and learned.to_json() == doc and list(learned.to_json()) == list(doc)
        assert learned.dumps() == text
        assert all(isinstance(w, Winner) and w.function for w in learned.winners)


def test_a_winner_without_its_distance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    path.write_text(json.dumps({"schema_version": 1, "winners": [{"function": "f", "hint": 3}]}))
    with pytest.raises(UsageError, match="distance_bytes"):
        Learned.read(path)


def test_a_built_result_lists_its_typed_keys_then_the_rest() -> None:
    w = Winner("ggml_vec_dot_q8_0_q8_0", 1024, 3, key="k", rest={"ratio": 1.1})
    assert w.to_json() == {"function": "ggml_vec_dot_q8_0_q8_0", "distance_bytes": 1024, "hint": 3, "key": "k",
                           "loop": None, "stream": None, "ratio": 1.1}
    assert w.get("ratio") == 1.1
