"""ci/setup.sh on a stock distribution: with the distribution's Python first on PATH it makes the project's
virtual environment and installs into it, never into the system Python (PEP 668 refuses that anyway).

The check is real — a copy of this checkout, the distribution's /usr/bin/python3, pip from the package
index — except for two things it must not do to the machine: `apt-get` and `sudo` are stand-ins that only
log, and the system Python is made to look as if python3-venv were missing (its ensurepip hidden) until the
stand-in apt-get "installs" python3-venv, so the install path a stock machine takes is exercised too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _copy_checkout(dest: Path) -> None:
    """The tracked files as they are in the work tree: what a fresh clone of this state would hold."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        if not name:
            continue
        src, dst = REPO / name, dest / name
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)


def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def test_setup_uses_a_venv_made_by_the_distribution_python(tmp_path: Path):
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no distribution Python at /usr/bin/python3")
    if subprocess.run([str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True).returncode:
        pytest.skip("python3-venv is not installed: ci/setup.sh would install it, and this test leaves the system be")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")

    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)

    # Stand-ins, first on PATH: python3 is the distribution's (logged), with ensurepip hidden until
    # apt-get installs python3-venv; apt-get and sudo only log; a bare pip/pip3 fails.
    stubs, hidden, log = tmp_path / "stubs", tmp_path / "no-ensurepip", tmp_path / "calls.log"
    stubs.mkdir()
    hidden.mkdir()
    (hidden / "ensurepip.py").write_text("raise ImportError('ensurepip hidden: python3-venv not installed')\n")
    _script(stubs / "python3", f'echo "python3 $*" >> {log}\nPYTHONPATH={hidden} exec {SYSTEM_PYTHON} "$@"\n')
    _script(stubs / "apt-get", f'echo "apt-get $*" >> {log}\n'
                               f'case " $* " in *" install "*" python3-venv "*) rm -f {hidden}/ensurepip.py;; esac\n')
    _script(stubs / "sudo", f'echo "sudo $*" >> {log}\nexec "$@"\n')
    for pip in ("pip", "pip3"):
        _script(stubs / pip, f'echo "{pip} $*" >> {log}\nexit 1\n')

    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "AMPPATCH_VENV", "PYENV_VERSION")}
    env.update(PATH=f"{stubs}:{SYSTEM_PATH}", CI="true")

    def setup() -> tuple[subprocess.CompletedProcess, float]:
        start = time.monotonic()
        done = subprocess.run(["bash", "ci/setup.sh"], cwd=checkout, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done, time.monotonic() - start

    venv = checkout / ".venv"
    first, _ = setup()
    assert first.stdout.strip().splitlines() == [str(venv)]
    calls = log.read_text().splitlines()
    apt = [c for c in calls if c.startswith("apt-get")]
    assert len(apt) == 2 and apt[0].startswith("apt-get update") and apt[1].split()[-1] == "python3-venv", calls
    assert not any(c.startswith("pip") for c in calls), calls
    assert not any("pip" in c.split() for c in calls if c.startswith("python3")), calls  # no pip on the system one

    # The venv was made by the distribution's Python, and everything the scripts run comes from it.
    base = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True)
    assert base.stdout.strip() == str(SYSTEM_PYTHON.parent.parent)
    for args in (["amppatch", "--help"], ["python", "-m", "ruff", "--version"],
                 ["python", "-m", "mypy", "--version"], ["python", "-m", "pytest", "--version"]):
        done = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env={"PATH": SYSTEM_PATH},
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0 and done.stdout, (args, done.stderr)

    # Done is done: the stamp records what was installed (pyproject.toml's hash among it), and a second run
    # neither installs nor calls apt-get, and is quick.
    digest = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()
    assert f"pyproject={digest} " in (venv / ".amppatch-setup").read_text()
    log.write_text("")
    again, seconds = setup()
    assert again.stdout.strip() == str(venv)
    assert "installing" not in again.stderr and log.read_text().count("apt-get") == 0, again.stderr
    assert seconds < 20, seconds


def test_the_test_run_spawns_the_venv_amppatch():
    """Under ci/test.sh the venv's bin/ is first on PATH, so tests that spawn `amppatch` get the venv's."""
    venv = os.environ.get("VIRTUAL_ENV")
    if not venv or Path(venv).resolve() != Path(sys.prefix).resolve():
        pytest.skip("not run from ci/test.sh's virtual environment")
    found = shutil.which("amppatch")
    assert found is not None and Path(found).parent.resolve() == (Path(venv) / "bin").resolve(), found
