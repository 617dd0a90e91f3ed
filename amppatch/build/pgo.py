"""Profile-guided builds: the training runs between the instrumented and the optimized build, and the
training models a resolved build names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch.build.options import Build, run_env, runtime_args
from amppatch.proc import progress, run

if TYPE_CHECKING:
    from amppatch.build.resolution import ResolvedBuild


def _pgo_train(rb: ResolvedBuild, build_dir: Path) -> None:
    tmp_build = Build(build_dir, {"amx_batch1": rb.amx_batch1}, Path(rb.source_dir))  # same runtime needs
    bench = tmp_build.program("bench")
    models = pgo_training_models(rb.pgo_training)
    for i, model in enumerate(models, 1):
        progress(f"pgo: training run {i}/{len(models)} (llama-bench token generation on {model.name}) ...")
        run([bench, "-m", str(model), "-p", "0", "-n", "32", "-r", "2", "-t", str(os.cpu_count() or 1),
             "-o", "jsonl", *runtime_args(tmp_build)],
            env=run_env(tmp_build), timeout=1800, what="PGO training run",
            next_step="check that the training model loads with the instrumented build")


def pgo_training_models(training: str | None) -> tuple[Path, ...]:
    """The models of a resolved `pgo_training` ("path:size;path:size")."""
    return tuple(Path(entry.rsplit(":", 1)[0]) for entry in training.split(";")) if training else ()
