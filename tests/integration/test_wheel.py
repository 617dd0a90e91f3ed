"""amppatch works installed from a wheel, not only editable: C sources and templates ship as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_c_sources_and_templates(tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("amppatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "amppatch/probes/isa_probe.c" in names
    shipped_c = {n for n in names if n.endswith(".c")}
    repo_c = {str(p.relative_to(REPO)) for p in (REPO / "amppatch").rglob("*.c")}
    assert repo_c <= shipped_c
    templates = {str(p.relative_to(REPO)) for p in (REPO / "amppatch" / "templates").glob("*") if p.is_file()}
    assert templates <= names

    # Installed (not editable) into a fresh directory, the package finds its own data.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = (
        "import amppatch, importlib.resources as r, pathlib;"
        f"assert str(pathlib.Path(amppatch.__file__).parent).startswith({str(target)!r}), amppatch.__file__;"
        "print((r.files('amppatch') / 'probes' / 'isa_probe.c').read_text()[:20])"
    )
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "amppatch" in done.stdout
