import signal

import pytest

from amppatch.errors import ToolMissingError, UsageError
from amppatch.proc import describe_returncode, require_tool


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


def test_error_text_is_one_line_with_next_step():
    error = UsageError("bad thing", next_step="do this")
    assert str(error) == "bad thing — do this"
    assert "\n" not in str(error)
