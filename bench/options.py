"""The bench's options, their defaults and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from amppatch.errors import UsageError
from bench.arms import ARMS
from bench.configs import parse_only

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results.json"
DEFAULT_RESULTS_MD = REPO_ROOT / "docs" / "RESULTS.md"


@dataclass(frozen=True)
class BenchOptions:
    repo: Path | None = None
    only: tuple[str, ...] = ()  # configuration ids; () = all
    quick: bool = False
    arms: tuple[str, ...] = ARMS
    budget_minutes: float = 80.0  # with preparation cached the whole bench stays under 90 min
    tokens: int = 32
    reps: int = 2
    rounds: int | None = None  # fixed rounds per run instead of the budgeted stop rule
    min_effect: float = 0.03
    seed: int = 0
    learned: tuple[Path, ...] = ()  # tune's learned.json files, combined into one baked branch
    gcc_params: str | None = None  # skip the grid: use these --params
    search: bool = True  # quick distance/hint search for the amppatch arm when no learned.json
    results: Path = DEFAULT_RESULTS
    results_md: Path | None = DEFAULT_RESULTS_MD
    work: Path | None = None  # cached profiles, grid/search decisions, ab-test reports
    render_only: bool = False  # regenerate the Markdown from results.json, time nothing
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for k, v in data.items():
            if isinstance(v, Path):
                data[k] = str(v)
            elif isinstance(v, tuple):
                data[k] = [str(x) if isinstance(x, Path) else x for x in v]
        return data


def resolve_options(options: BenchOptions) -> BenchOptions:
    from amppatch.paths import cache_root

    unknown = [a for a in options.arms if a not in ARMS]
    if unknown:
        raise UsageError(f"unknown arm(s) {', '.join(unknown)}", next_step=f"choose among {', '.join(ARMS)}")
    if options.only:
        parse_only(",".join(options.only))
    if options.budget_minutes <= 0 or options.tokens < 1 or options.reps < 1:
        raise UsageError("--budget, --tokens and --reps must be positive", next_step="e.g. --budget 80")
    for learned in options.learned:
        if not Path(learned).is_file():
            raise UsageError(f"{learned} does not exist", next_step="pass the learned.json `amppatch tune` wrote")
    arms = tuple(a for a in ARMS if a in options.arms or a == "stock")
    work = Path(options.work or cache_root() / "bench").expanduser().resolve()
    return replace(options, arms=arms, work=work, results=Path(options.results).expanduser().resolve(),
                   learned=tuple(Path(p).resolve() for p in options.learned))
