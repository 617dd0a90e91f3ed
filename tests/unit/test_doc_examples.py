"""Every command example in the docs parses with the real command-line parser (pure: nothing is run).

The examples are the ```sh blocks of README.md, docs/*.md and bench/README.md. A logical line (line
continuations joined, `# comments` dropped) is split into simple commands at `|`, `&&`, `||` and `;`;
`$(...)` substitutions are examples of their own and stand for one word in the line that holds them;
`<placeholder text>` stands for one word. A command is an amppatch example when, after leading `VAR=value`
assignments and the wrappers `flock FILE` / `timeout N` / `time` / `nice`, it is `amppatch ...` or
`python -m amppatch ...`; `python -m bench.compare ...` lines go to the bench's parser.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amppatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
_SEPARATORS = {"|", "||", "&&", ";", "&"}
_WRAPPERS = {"flock": 1, "timeout": 1, "time": 0, "nice": 0}  # command -> words it takes before the command


def _sh_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, logical line) of every ```sh block, continuation lines joined."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block and line.strip() in ("```sh", "```bash", "```shell")
            pending = ""
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _strip_comment(line: str) -> str:
    """The line without its `# comment` (a '#' outside quotes that starts a word, as the shell reads it)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _substitutions(line: str) -> tuple[str, list[str]]:
    """The line with each `$(...)` replaced by one word, and the commands inside them."""
    inner: list[str] = []
    out, i = "", 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            inner.append(line[i + 2 : j - 1])
            out += "SUBSTITUTED"
            i = j
        else:
            out += line[i]
            i += 1
    return out, inner


def _commands(line: str) -> Iterator[list[str]]:
    """The words of every simple command on a logical line (substitutions included)."""
    line, inner = _substitutions(_strip_comment(line))
    for command in inner:
        yield from _commands(command)
    line = re.sub(r"(?<![\w'\"])<[^<>'\"]*>", "PLACEHOLDER", line)  # `--b <B of the apply above>`
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    for word in lexer:
        if word in _SEPARATORS:
            yield words
            words = []
        else:
            words.append(word)
    yield words


def _invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """("amppatch" | "bench", its arguments) when the command runs one of them, else None."""
    i = 0
    while i < len(words):
        if re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]):
            i += 1
        elif words[i] in _WRAPPERS:
            i += 1 + _WRAPPERS[words[i]]
        else:
            break
    rest = words[i:]
    if rest[:1] == ["amppatch"]:
        return "amppatch", rest[1:]
    if len(rest) >= 3 and re.fullmatch(r"python3?", rest[0]) and rest[1] == "-m":
        if rest[2] == "amppatch":
            return "amppatch", rest[3:]
        if rest[2] == "bench.compare":
            return "bench", rest[3:]
    return None


def examples(text: str) -> Iterator[tuple[int, str, list[str]]]:
    for number, line in _sh_lines(text):
        for words in _commands(line):
            found = _invocation(words)
            if found:
                yield number, found[0], found[1]


def _parsers() -> dict[str, Callable[[list[str]], object]]:
    from bench.compare import parse_args as bench_parse

    return {"amppatch": build_parser().parse_args, "bench": bench_parse}


def parse_failure(kind: str, argv: list[str]) -> str | None:
    """argparse's complaint about `argv`, or None when it parses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parsers()[kind](argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exited"
    return None


def test_the_extraction_reads_shell_as_the_shell_does() -> None:
    text = "\n".join([
        "text before", "```sh",
        "repo=$(amppatch llama fetch | tail -n 1)        # the tree",
        'A=1 B="x y" amppatch build --repo "$repo" \\',
        '    --kernel-cflags "-fprefetch-loop-arrays"',
        "flock /tmp/l amppatch report d --slices 2 && echo done",
        "amppatch apply --repo $R --site f#0 --site 'g<a, b>::apply'   # f#0 is not a comment",
        "amppatch ab-test --a $B --b <B of the apply above> -m m; python -m bench.compare --quick",
        "```", "```", "amppatch not-a-shell-block", "```",
    ])
    found = list(examples(text))
    assert found == [
        (3, "amppatch", ["llama", "fetch"]),
        (4, "amppatch", ["build", "--repo", "$repo", "--kernel-cflags", "-fprefetch-loop-arrays"]),
        (6, "amppatch", ["report", "d", "--slices", "2"]),
        (7, "amppatch", ["apply", "--repo", "$R", "--site", "f#0", "--site", "g<a, b>::apply"]),
        (8, "amppatch", ["ab-test", "--a", "$B", "--b", "PLACEHOLDER", "-m", "m"]),
        (8, "bench", ["--quick"]),
    ]


def test_a_wrong_example_is_reported() -> None:
    assert parse_failure("amppatch", ["build", "--repo", "r", "--kernel-cflags"]) is not None
    assert parse_failure("amppatch", ["apply", "--repo", "r", "--no-such-option"]) is not None
    assert parse_failure("bench", ["--budget", "soon"]) is not None


@pytest.mark.parametrize("spelling", [["--kernel-cflags", "-O2"], ["--kernel-cflags=-O2"]])
def test_flag_values_parse_in_both_spellings(spelling: list[str]) -> None:
    args = build_parser().parse_args(["build", "--repo", "r", *spelling])
    assert args.kernel_cflags == "-O2"


def test_every_flag_taking_option_takes_a_dash_value() -> None:
    parse = build_parser().parse_args
    assert parse(["apply", "--repo", "r", "--cflags", "-O3", "--gate-arg", "-fa", "--gate-arg", "on"]).gate_arg == [
        "-fa", "on"]
    assert parse(["ab-test", "--a", "x", "--b", "y", "-m", "m", "--gate-args", "-nr"]).gate_args == "-nr"
    assert parse(["tune", "--repo", "r", "-m", "m", "--bench-arg", "-nr"]).bench_arg == ["-nr"]
    assert parse(["run", "--kernel-cflags", "-fprefetch-loop-arrays"]).kernel_cflags == "-fprefetch-loop-arrays"
    # after `--` every word is the profiled command's, not an option of amppatch's
    assert parse(["profile", "--model", "m", "--", "./p", "--cflags", "-x"]).command == ["--", "./p", "--cflags", "-x"]
    # a flag option followed by another option of the command most likely lost its value: refused, with the fix
    assert "write --cflags=--pgo" in (parse_failure("amppatch", ["build", "--repo", "r", "--cflags", "--pgo"]) or "")


def test_every_documented_command_parses() -> None:
    checked, failures = 0, []
    for doc in DOCS:
        for number, kind, argv in examples(doc.read_text()):
            checked += 1
            failure = parse_failure(kind, argv)
            if failure:
                failures.append(f"{doc.relative_to(ROOT)}:{number}: {shlex.join(argv)}: {failure}")
    assert not failures, "\n".join(failures)
    # the command reference's examples are in (the count guards against an extractor that finds nothing)
    reference = list(examples((ROOT / "docs" / "commands.md").read_text()))
    assert len(reference) >= 30 and checked > len(reference)
    assert any(argv[:1] == ["build"] and "--kernel-cflags" in argv for _, _, argv in reference)
    assert list(examples((ROOT / "README.md").read_text()))
