"""The one subprocess helper: argv lists (never a shell), named missing tools, signals explained."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import SubprocessError, ToolMissingError

# Why a child most likely died of a given signal, in the words a user can act on.
_SIGNAL_CAUSES: dict[int, str] = {
    signal.SIGILL: "illegal instruction: the binary uses a CPU feature this machine advertises but does not execute "
    "(e.g. AMX tiles on some VMs); rebuild without it (`amppatch doctor` shows which features fault)",
    signal.SIGSEGV: "segmentation fault: a bad memory access in the program (or a truncated model file)",
    signal.SIGBUS: "bus error: usually a model file that shrank or a full disk while it was mapped",
    signal.SIGABRT: "aborted: the program hit an assertion or GGML_ABORT; its last output lines say which",
    signal.SIGKILL: "killed: most often the kernel's out-of-memory killer, or a timeout",
    signal.SIGFPE: "arithmetic exception in the program",
}


def describe_returncode(returncode: int) -> str:
    """Turn a Popen return code into words: 'exit status 2' or 'killed by SIGILL (illegal instruction: …)'."""
    if returncode >= 0:
        return f"exit status {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cause = _SIGNAL_CAUSES.get(signum)
    return f"killed by {name} ({cause})" if cause else f"killed by {name}"


def require_tool(name: str, *, install_hint: str) -> str:
    """Return the absolute path of `name` on PATH, or raise an error that names the tool and how to get it."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"`{name}` is not installed or not on PATH", next_step=install_hint)
    return path


@dataclass(frozen=True)
class Completed:
    """What a finished child left behind."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
    what: str | None = None,
    next_step: str | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run a child to completion with captured output.

    With ``check`` a non-zero exit raises SubprocessError whose message says what failed (`what`, default
    the program name), how it ended (signals explained) and the tail of its stderr.
    """
    args = [os.fspath(a) for a in argv]
    label = what or Path(args[0]).name
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(
            f"cannot run `{args[0]}`: not found", next_step=next_step or "install it or check the path"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise SubprocessError(
            f"{label} did not finish within {timeout:.0f} s",
            next_step=next_step or "raise the timeout or check that the machine is not overloaded",
            output_tail=_tail(out),
        ) from exc
    done = Completed(tuple(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)
    if check and proc.returncode != 0:
        raise SubprocessError(
            f"{label} failed: {describe_returncode(proc.returncode)}",
            next_step=next_step,
            returncode=proc.returncode,
            output_tail=_tail(proc.stderr or proc.stdout),
        )
    return done


def stream(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    keep_lines: int = 400,
) -> tuple[int, list[str]]:
    """Run a child whose merged stdout/stderr is handed line by line to `on_line` (for progress).

    Returns the exit code and the last `keep_lines` lines, so a caller can pick the error lines out of a
    failed build without keeping the whole log in memory.
    """
    args = [os.fspath(a) for a in argv]
    tail: deque[str] = deque(maxlen=keep_lines)
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            # its own process group, so an interrupted caller can stop the child's children too (a build's
            # compilers) before it removes what they write into
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(f"cannot run `{args[0]}`: not found", next_step="install it") from exc
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line is not None:
                on_line(line)
        return proc.wait(), list(tail)
    except BaseException:
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    """Terminate a child started in its own session and everything in its process group; wait until the
    group is gone (SIGKILL after 10 s), so no grandchild keeps writing after we return."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def progress(message: str) -> None:
    """Progress goes to stderr so stdout's last line stays the command's result path."""
    print(message, file=sys.stderr, flush=True)
