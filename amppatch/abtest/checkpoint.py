"""ab-test's round checkpoint: the raw samples of every finished round, kept beside the report so that a race
that was interrupted (Ctrl-C, a lost machine, a terminal that closed) goes on where it stopped.

After each round ab-test writes `rounds.json` (versioned) into its output directory: the samples, the failures,
the correctness gate's records, the per-token latencies, what each arm's warmup saw (its first llama-bench
record, its weights' huge-page share) and the seconds spent, under a fingerprint of what the samples measure
(arms and their builds, model file, settings, repetitions, seed, CPU mask, tracer). `--resume` (and `amppatch
run`'s final race and tune's probe batches, always) reads it back when the fingerprint matches: the gate is
not run again, the schedule's generator is advanced past the rounds done, so the resumed race plays exactly
the rounds an uninterrupted one would have. A race whose recorded rounds already meet its stop rule is not
warmed up again: the warmup records come from the checkpoint. The file stays after a finished race, so a
rerun given more rounds or time lengthens it; any mismatch starts afresh and says why. Pure apart from `load`
and `save`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amppatch.abtest.analysis import Sample
from amppatch.abtest.options import AbTestOptions, Setting, _Arm
from amppatch.paths import write_text_atomic
from amppatch.weightpages import WeightPages

CHECKPOINT_FILE = "rounds.json"
SCHEMA_VERSION = 1
TRACES_OF = "generation steps"  # what the per-token latencies in `traces` time (one-token decode calls)


def fingerprint(options: AbTestOptions, arms: list[_Arm], settings: tuple[Setting, ...]) -> dict[str, Any]:
    """What makes two races' samples the same measurement. Options that only change the analysis or when
    to stop (--max-time, --rounds, --min-effect, pairs, the roofline) are left out, so a resumed race may
    be given more time."""
    model = Path(options.model)
    stat = model.stat()
    return {
        "arms": [{"name": a.spec.name, "build": str(a.build.dir), "build_key": a.build.manifest.get("key"),
                  "bench_args": list(a.spec.bench_args), "env": dict(a.spec.env)} for a in arms],
        "model": {"path": str(model), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        "settings": [s.id for s in settings],
        "reps": options.reps,
        "seed": options.seed,
        "cpu_mask": options.cpu_mask,
        "latency": options.latency,
    }


@dataclass(frozen=True)
class Checkpoint:
    """The rounds a race has finished, and what it needs to go on."""

    fingerprint: dict[str, Any]
    rounds: int
    elapsed_seconds: float  # wall time of the sittings so far (setup, gate, warmup, rounds)
    samples: tuple[Sample, ...]
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    correctness: tuple[dict[str, Any], ...] = ()
    traces: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # per arm name: {"first_record": llama-bench's first record less its samples, "huge_pages": WeightPages
    # JSON or None}; empty in a checkpoint written before it was kept (that race is warmed up again)
    warmups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "rounds": self.rounds,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "samples": [asdict(s) for s in self.samples],
            "failures": [{"arm": a, "setting": s, "reason": r} for (a, s), r in self.failures.items()],
            "correctness": list(self.correctness),
            "traces": [{"arm": a, "setting": s, "token_ns": v} for (a, s), v in self.traces.items()],
            "traces_of": TRACES_OF,
            "warmups": self.warmups,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        return cls(
            fingerprint=dict(data["fingerprint"]),
            rounds=int(data["rounds"]),
            elapsed_seconds=float(data["elapsed_seconds"]),
            samples=tuple(Sample(**s) for s in data["samples"]),
            failures={(f["arm"], f["setting"]): str(f["reason"]) for f in data.get("failures", [])},
            correctness=tuple(data.get("correctness", [])),
            # latencies recorded before they were the generation steps alone (they held the context fill
            # too) are not mixed with this sitting's: the resumed race reports its own sittings' steps only
            traces={(t["arm"], t["setting"]): [float(x) for x in t["token_ns"]] for t in data.get("traces", [])}
            if data.get("traces_of") == TRACES_OF else {},
            warmups={str(k): dict(v) for k, v in (data.get("warmups") or {}).items()},
        )


def warmup_records(arms: list[_Arm]) -> dict[str, dict[str, Any]]:
    """What each arm's warmup saw, for the checkpoint (arms no warmup ran for are left out)."""
    return {a.spec.name: {"first_record": a.bench_meta["first_record"],
                          "huge_pages": a.pages.to_json() if a.pages is not None else None}
            for a in arms if "first_record" in a.bench_meta}


def restore_warmups(checkpoint: Checkpoint, arms: list[_Arm]) -> bool:
    """Give every arm what its warmup saw in the sitting that recorded `checkpoint`; False (and nothing
    changed) when the checkpoint lacks an arm's record, so the race must warm that arm up itself."""
    if any(a.spec.name not in checkpoint.warmups for a in arms):
        return False
    for a in arms:
        record = checkpoint.warmups[a.spec.name]
        a.bench_meta["first_record"] = dict(record["first_record"])
        pages = record.get("huge_pages")
        a.pages = WeightPages.from_json(pages) if pages else None
    return True


def load(out: Path, expected: dict[str, Any]) -> tuple[Checkpoint | None, str]:
    """The checkpoint in `out` if it belongs to this race; else None and why it is not used."""
    path = Path(out) / CHECKPOINT_FILE
    if not path.exists():
        return None, f"no {CHECKPOINT_FILE} in {out}: starting the race from round 1"
    try:
        checkpoint = Checkpoint.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path} is unreadable ({exc}): starting the race from round 1"
    if checkpoint.fingerprint != expected:
        differ = sorted(k for k in set(expected) | set(checkpoint.fingerprint)
                        if expected.get(k) != checkpoint.fingerprint.get(k))
        return None, (f"{path} belongs to another race (it differs in {', '.join(differ)}): starting the race "
                      "from round 1")
    if checkpoint.rounds < 1:
        return None, f"{path} holds no finished round: starting the race from round 1"
    return checkpoint, f"resuming after {checkpoint.rounds} round(s) recorded in {path}"


def save(out: Path, checkpoint: Checkpoint) -> None:
    write_text_atomic(Path(out) / CHECKPOINT_FILE, json.dumps(checkpoint.to_json()) + "\n")

