"""Session fixtures for integration tests: the pinned llama.cpp tree, its native build, tiny models.

All of them live in amppatch's cache (outside the repo), so the second test run reuses them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amppatch.build import Build, BuildOptions, build
from amppatch.model import SynthOptions, synth_model
from amppatch.workspace import FetchOptions, fetch_llama


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def llama_repo() -> Path:
    return fetch_llama(FetchOptions())


@pytest.fixture(scope="session")
def native_build(llama_repo: Path) -> Build:
    return build(BuildOptions(repo=llama_repo, name="native"))


@pytest.fixture(scope="session")
def amx_build(llama_repo: Path) -> Build:
    """The AMX buffer compiled for this CPU (`--amx-batch1`): its batch-1 kernels run here without AMX."""
    return build(BuildOptions(repo=llama_repo, name="amx-batch1", amx_batch1=True))


def _tiny(native_build: Build, weight_type: str) -> Path:
    return synth_model(SynthOptions(shape="tiny", type=weight_type, build=native_build))


@pytest.fixture(scope="session")
def tiny_model_q8_0(native_build: Build) -> Path:
    return _tiny(native_build, "q8_0")


@pytest.fixture(scope="session")
def tiny_model_f16(native_build: Build) -> Path:
    return _tiny(native_build, "f16")


@pytest.fixture(scope="session")
def tiny_model_q4_0(native_build: Build) -> Path:
    return _tiny(native_build, "q4_0")


@pytest.fixture(scope="session")
def tiny_model_q4_k(native_build: Build) -> Path:
    return _tiny(native_build, "q4_k")


@pytest.fixture(scope="session")
def tiny_model_q6_k(native_build: Build) -> Path:
    return _tiny(native_build, "q6_k")
