"""The one subprocess helper against real children: a signal death and a missing program."""

import signal
import sys

import pytest

from amppatch.errors import SubprocessError, ToolMissingError
from amppatch.proc import run


def test_run_reports_signal_death_and_stderr_tail():
    code = (
        "import os, sys, signal; sys.stderr.write('last words\\n'); sys.stderr.flush(); "
        "os.kill(os.getpid(), signal.SIGSEGV)"
    )
    with pytest.raises(SubprocessError) as info:
        run([sys.executable, "-c", code], what="victim")
    message = str(info.value)
    assert "victim failed" in message and "SIGSEGV" in message and "last words" in message
    assert info.value.returncode == -signal.SIGSEGV


def test_run_missing_program_is_a_tool_error():
    with pytest.raises(ToolMissingError):
        run(["/nonexistent/amppatch-binary"])


