"""The type check stays on: pyproject.toml configures mypy for the amppatch package with every function
annotated, the test extra installs it and ci/test.sh runs it. Pure: reads the two files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: mypy depends on tomli there, so the test extra brings it
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_mypy_checks_the_package_with_every_function_annotated() -> None:
    mypy = _pyproject()["tool"]["mypy"]
    assert "amppatch" in mypy.get("packages", []) or "amppatch" in mypy.get("files", [])
    assert mypy.get("disallow_untyped_defs") is True
    assert mypy.get("warn_unused_ignores") is True


def test_no_override_switches_the_check_off_for_the_whole_package() -> None:
    """An override may relax named modules, never the package (`amppatch`, `amppatch.*`) or everything."""
    for override in _pyproject()["tool"]["mypy"].get("overrides", []):
        modules = override["module"]
        modules = [modules] if isinstance(modules, str) else modules
        relaxes = override.get("ignore_errors") is True or override.get("disallow_untyped_defs") is False
        if relaxes:
            for module in modules:
                assert module.startswith("amppatch.") and not module.endswith("*"), module


def test_the_test_extra_installs_mypy_and_ci_runs_it() -> None:
    extra = _pyproject()["project"]["optional-dependencies"]["test"]
    assert any(re.match(r"mypy\b", requirement) for requirement in extra), extra
    script = (ROOT / "ci" / "test.sh").read_text(encoding="utf-8")
    runs = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    mypy_at = next(i for i, line in enumerate(runs) if re.search(r"-m mypy\b", line))
    pytest_at = next(i for i, line in enumerate(runs) if re.search(r"-m pytest\b", line))
    assert mypy_at < pytest_at  # before the tests, as ruff
