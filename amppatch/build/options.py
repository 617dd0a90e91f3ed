"""What `amppatch build` is asked for and what it hands back: the options, the finished build (its
directory and manifest) and how its binaries are run (library path, the AMX permission shim)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from amppatch.build.programs import CANDIDATES, CURRENT_NAMES
from amppatch.errors import UsageError
from amppatch.inputs import BUILD_MANIFEST, read_json

SCHEMA_VERSION = 1
# The programs amppatch runs, by their current names; each stands for its role, so a tree that names one
# otherwise builds its own (programs.TreePrograms.target_for).
DEFAULT_TARGETS = tuple(CURRENT_NAMES.values())

# Options that keep a build CPU-only and offline. Each is passed only when this llama.cpp version declares
# it (options come and go between versions; passing an unknown one only warns, but the manifest should say
# what really applied).
_OFFLINE_CPU_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "ON",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "GGML_CCACHE": "OFF",  # amppatch sets the compiler launcher itself (and keys ccache its own way)
}
_ALWAYS = {"CMAKE_BUILD_TYPE", "CMAKE_EXPORT_COMPILE_COMMANDS"}


@dataclass(frozen=True)
class BuildOptions:
    """What to build. Everything but `name` goes into the build key."""

    repo: Path
    ref: str | None = None
    name: str | None = None
    cflags: str = ""
    kernel_cflags: str = ""
    defines: tuple[tuple[str, str], ...] = ()
    pgo: bool = False
    # PGO training models: one llama-bench run each, so every kernel they use is trained on its own trip counts
    pgo_models: tuple[Path, ...] = ()
    targets: tuple[str, ...] = DEFAULT_TARGETS
    allow_faulting_isa: bool = False
    # Compile the AMX buffer (ggml-cpu/amx) for a CPU without AMX: its batch-1 kernels need AVX512-VNNI
    # only; runs preload a shim that grants the AMX permission request, and prompts go one token per
    # micro-batch (-ub 1) because the tile kernels (batch > 1) would fault.
    amx_batch1: bool = False


@dataclass(frozen=True)
class Build:
    dir: Path
    manifest: dict = field(compare=False)
    source_dir: Path

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise UsageError(
                f"build {self.dir} has no {name}",
                next_step=f"rebuild with that target (amppatch build --repo {self.manifest.get('repo') or 'DIR'} ...)",
            )
        return path

    def program_name(self, role: str) -> str:
        """The name this build's tree gives a role's program (`completion`: llama-completion, or llama-cli
        in older trees), as its manifest records; a manifest from before that record: the current name."""
        recorded = self.manifest.get("programs")
        if not isinstance(recorded, dict) or role not in recorded:
            return CURRENT_NAMES[role]
        name = recorded[role]
        if not name:
            raise UsageError(
                f"build {self.dir} is of a llama.cpp that declares no {' or '.join(CANDIDATES[role])} program",
                next_step="use a newer llama.cpp tree (`amppatch llama fetch`)")
        return str(name)

    def program(self, role: str) -> Path:
        """The binary of a role (bench, completion, perplexity, quantize) in this build."""
        return self.binary(self.program_name(role))


def run_env(build: Build) -> dict[str, str]:
    """Environment for running a build's binaries: its own shared libraries first; for an --amx-batch1
    build, the AMX permission shim preloaded (ahead of any LD_PRELOAD already set)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(build.bin_dir), env.get("LD_LIBRARY_PATH", "")]))
    if build.manifest.get("amx_batch1"):
        from amppatch.shims import amx_permit_library

        env["LD_PRELOAD"] = ":".join(filter(None, [str(amx_permit_library()), env.get("LD_PRELOAD", "")]))
    return env


def runtime_args(build: Build, given: Sequence[str] = ()) -> tuple[str, ...]:
    """llama.cpp arguments every run of this build needs: one token per micro-batch where only the AMX
    buffer's batch-1 kernels can execute (its tile kernels for batch > 1 raise SIGILL) — unless the
    arguments `given` already set the micro-batch (`-ub N`, `--ubatch-size=N`)."""
    if not build.manifest.get("amx_batch1"):
        return ()
    return () if {a.split("=", 1)[0] for a in given} & {"-ub", "--ubatch-size"} else ("-ub", "1")


def load_build(path: Path) -> Build:
    """A build from its directory or its manifest.json."""
    path = Path(path).expanduser()
    manifest_path = path if path.name == "manifest.json" else path / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(
            f"{path} is not a finished amppatch build (no manifest.json)",
            next_step="pass a directory printed by `amppatch build` (or its manifest.json); a build that failed "
            "has no manifest and is not usable",
        )
    manifest = read_json(manifest_path, BUILD_MANIFEST)
    return Build(manifest_path.parent.resolve(), manifest, Path(manifest["source_dir"]))
