"""tune.png's content is derived from learned.json by a pure function; the drawing itself is smoke-checked."""

from pathlib import Path

from amppatch.tune.plot import landscapes, render_landscape


def _probe(distance: int, hint: int, ratio: float, *, rounds: int = 4, threads: int = 1, phase: str = "coarse"):
    return {"site": "k#0 x[i]", "distance_bytes": distance, "hint": hint, "ratio": ratio,
            "ci95": [ratio - 0.02, ratio + 0.02], "rounds": rounds, "threads": threads, "phase": phase}


LEARNED = {
    "threads": 1,
    "sites": [{"key": "k#0 x[i]", "kept": True, "reason": "ok",
               "winner": {"distance_bytes": 4096, "hint": 3}}],
    "probes": [_probe(2048, 3, 1.01), _probe(4096, 3, 1.08), _probe(4096, 3, 1.10, rounds=8, phase="confirm"),
               _probe(2048, 0, 0.95), _probe(4096, 3, 1.04, threads=2, phase="verify"),
               {"site": "other", "distance_bytes": 1, "hint": 0, "ratio": 2.0, "threads": 1}],
}


def test_one_line_per_hint_through_the_most_measured_probe() -> None:
    (site,) = landscapes(LEARNED)
    assert {h: [(p.distance, p.ratio) for p in ps] for h, ps in site.lines.items()} == {
        0: [(2048, 0.95)], 3: [(2048, 1.01), (4096, 1.10)]}
    assert [(p.distance, p.ratio) for p in site.others] == [(4096, 1.08)]  # the coarse look the confirm replaced
    assert site.winner == (4096, 3) and site.kept
    assert site.verified[2].ratio == 1.04


def test_png_is_written_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    out = render_landscape(LEARNED, tmp_path / "tune.png")
    assert out == tmp_path / "tune.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tune.png"]
    assert render_landscape({"sites": [], "probes": []}, tmp_path / "none.png") is None
