"""The AMX permission shim, compiled on first use, is preloaded ahead of the user's own LD_PRELOAD."""

from pathlib import Path

import pytest


def test_amx_batch1_runs_get_the_shim_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch.build import Build, run_env

    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    plain = Build(tmp_path, {"amx_batch1": False}, tmp_path)
    amx = Build(tmp_path, {"amx_batch1": True}, tmp_path)
    assert run_env(plain)["LD_PRELOAD"] == "/other.so"
    first, rest = run_env(amx)["LD_PRELOAD"].split(":", 1)
    assert first.endswith("libamxpermit.so") and Path(first).is_file() and rest == "/other.so"
