import signal
import sys

import pytest

from amppatch.errors import SubprocessError, ToolMissingError, UsageError
from amppatch.proc import describe_returncode, require_tool, run


def test_signal_is_named_with_its_likely_cause():
    text = describe_returncode(-signal.SIGILL)
    assert "SIGILL" in text and "illegal instruction" in text
    assert describe_returncode(3) == "exit status 3"
    assert "SIGKILL" in describe_returncode(-signal.SIGKILL)


def test_missing_tool_is_named_with_install_hint():
    with pytest.raises(ToolMissingError) as info:
        require_tool("definitely-not-a-tool-amppatch", install_hint="apt-get install -y x")
    assert "definitely-not-a-tool-amppatch" in str(info.value)
    assert "apt-get install -y x" in str(info.value)


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


def test_error_text_is_one_line_with_next_step():
    error = UsageError("bad thing", next_step="do this")
    assert str(error) == "bad thing — do this"
    assert "\n" not in str(error)
