"""One error family. Every error says what went wrong and what to do next; only ``cli.main`` catches them."""

from __future__ import annotations


class AmppatchError(Exception):
    """Base of every error amppatch reports to the user (never a traceback)."""

    exit_code = 1

    def __init__(self, message: str, *, next_step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.next_step = next_step

    def __str__(self) -> str:
        if self.next_step:
            return f"{self.message} — {self.next_step}"
        return self.message


class UsageError(AmppatchError):
    """The command line or an input file is wrong."""

    exit_code = 2


class ToolMissingError(AmppatchError):
    """A program amppatch needs (cmake, a compiler, git, ...) is not installed."""

    exit_code = 3


class SubprocessError(AmppatchError):
    """A child process failed; the message carries its exit status (or signal) and the tail of its output."""

    exit_code = 4

    def __init__(
        self,
        message: str,
        *,
        next_step: str | None = None,
        returncode: int | None = None,
        output_tail: str = "",
    ) -> None:
        super().__init__(message, next_step=next_step)
        self.returncode = returncode
        self.output_tail = output_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.output_tail:
            text += "\n" + self.output_tail
        return text


class BuildError(SubprocessError):
    """CMake configure or build failed; the compiler's last error lines are attached."""

    exit_code = 5


class NetworkError(AmppatchError):
    """Something had to be downloaded and could not be."""

    exit_code = 6


class CorrectnessError(AmppatchError):
    """Two builds that must compute the same thing did not (different tokens or perplexity)."""

    exit_code = 7


class RegressionError(AmppatchError):
    """ab-test --fail-on-regression found the candidate measurably slower."""

    exit_code = 8


class UnmeasuredError(AmppatchError):
    """An ab-test (or run) finished and wrote its report, but an arm could not be measured at some setting
    (llama-bench rejected its flags, crashed, or cannot run that test here): the verdict is incomplete."""

    exit_code = 9


class WriteError(AmppatchError):
    """A result file or directory could not be written (disk full, read-only filesystem, no permission)."""

    exit_code = 10
