"""Out-of-tree CMake builds of llama.cpp, keyed by what determines the binaries, reused when identical.

A clean tree (or an explicit `ref`) is built from ONE amppatch-owned source checkout, a git repository in
the cache into which the commit's objects are fetched from the user's repository. The key is therefore the
content (commit, compiler, flags, options), not where the user's tree lives: every clone of a commit finds
the same build, and the baseline and a patched branch compile the same absolute paths, so ccache turns the
patched rebuild into a handful of real compiles. A dirty tree is built in place, with its path and a hash of
its uncommitted changes in the key.

A manifest is written only after a build succeeded. A build that fails or is interrupted is removed; one
whose process was killed outright is removed by the next build that finds it abandoned (no manifest, lock free).

The package is split along the build's seams; this module only re-exports the names other modules import:
``options`` (what is asked for, the finished `Build`, how its binaries run), ``resolution`` (options → the
`ResolvedBuild` whose hash is the key; the shared source checkout), ``cmake`` (configure and build),
``pgo`` (training runs), ``cleanup`` (failed, interrupted and abandoned build directories) and ``stage``
(`build()` and side builds).
"""

from __future__ import annotations

from amppatch.build.cleanup import _removed_unless_finished, remove_abandoned_builds
from amppatch.build.cmake import _error_excerpt, _kernel_flags_cmake
from amppatch.build.options import (
    DEFAULT_TARGETS,
    SCHEMA_VERSION,
    Build,
    BuildOptions,
    load_build,
    run_env,
    runtime_args,
)
from amppatch.build.pgo import pgo_training_models
from amppatch.build.resolution import (
    AMX_FLAGS,
    ResolvedBuild,
    _check_amx_batch1,
    declared_cmake_options,
    dirty_files,
    resolve,
    shared_checkout,
    with_options,
)
from amppatch.build.stage import build, build_side_target, source_text

__all__ = [
    "AMX_FLAGS", "DEFAULT_TARGETS", "SCHEMA_VERSION", "Build", "BuildOptions", "ResolvedBuild", "_check_amx_batch1",
    "_error_excerpt", "_kernel_flags_cmake", "_removed_unless_finished", "build", "build_side_target",
    "declared_cmake_options", "dirty_files", "load_build", "pgo_training_models", "remove_abandoned_builds",
    "resolve", "run_env", "runtime_args", "shared_checkout", "source_text", "with_options",
]
