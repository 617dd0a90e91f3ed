import argparse
import re
from pathlib import Path

import pytest

from amppatch.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_working_help():
    for name, sub in _subparsers(build_parser()).items():
        text = sub.format_help()
        assert text.startswith(f"usage: amppatch {name}") and "-h, --help" in text, name


def _documented_commands() -> set[str]:
    """Commands that have a reference section (`### `amppatch NAME ...``) in the README or docs/."""
    root = Path(__file__).resolve().parents[2]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return {m.group(1) for f in texts for m in re.finditer(r"^#{2,4} `amppatch ([a-z-]+)", f.read_text(), re.M)}


def test_help_lists_exactly_the_documented_commands(capsys):
    """A command in --help is built and documented; a documented command is in --help."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listed = set(re.findall(r"^    ([a-z-]+)(?:\s|$)", capsys.readouterr().out, re.M))
    assert listed == _documented_commands()


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_the_unit_tier_cannot_start_processes():
    """The guard in tests/unit/conftest.py is live: a unit test that spawns a process fails."""
    import subprocess

    with pytest.raises(RuntimeError, match="unit tests may not start processes"):
        subprocess.run(["true"], check=False)


@pytest.mark.parametrize("manifest, message", [
    ({"schema_version": 1, "source_dir": "/s"}, "lacks `repo`"),  # was KeyError: 'repo'
    ({"schema_version": 1, "source_dir": "/s", "repo": "/r", "cmake_options": "x"}, "cmake_options (an object)"),
    ({"schema_version": 1, "source_dir": "/s", "repo": "/r", "cmake_options": {}, "cflags": 5}, "`cflags` is not"),
])
@pytest.mark.parametrize("command", ["apply", "tune"])
def test_like_a_build_whose_manifest_lacks_its_options_is_one_line(tmp_path, capsys, manifest, message, command):
    import json

    like = tmp_path / "build"
    like.mkdir()
    (like / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "m.gguf").write_bytes(b"")
    extra = ["--dry-run"] if command == "apply" else ["--model", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "o")]
    assert main([command, "--repo", str(tmp_path), "--site", "f", "--like", str(like), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra", [["--gate-args", "-ub '1"], ["--b", "/b::-p 'x"], ["--arm", "C=/b::--repack \"0"]])
def test_ab_test_unbalanced_quotes_are_one_usage_line(tmp_path, capsys, extra):
    # were ValueError("No closing quotation") tracebacks from shlex
    (tmp_path / "m.gguf").write_bytes(b"")
    argv = ["ab-test", "--a", "/a", "--b", "/b", "-m", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is not valid shell words" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_ctrl_c_while_the_commands_import_is_130_without_a_traceback(monkeypatch, capsys):
    import amppatch.cli as cli

    def interrupted():
        raise KeyboardInterrupt  # as when SIGINT arrives during `from amppatch.patch import ...`

    monkeypatch.setattr(cli, "_command_modules", interrupted)
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err.strip() == "amppatch: interrupted"


@pytest.mark.parametrize("extra", [["--budget", "nan"], ["--budget", "inf"], ["--budget", "-5"],
                                   ["--probe-seconds", "nan"], ["--probe-seconds", "0"], ["--refine-levels", "-1"],
                                   ["--min-gain", "-1"], ["--min-gain", "nan"], ["--loss-tolerance", "2"],
                                   ["--loss-tolerance", "nan"], ["--min-share", "1"], ["--min-share", "-0.1"],
                                   ["--min-share", "nan"]])
def test_tune_refuses_numbers_its_search_cannot_use(tmp_path, capsys, extra):
    # nan passed tune's `<= 0` checks and went on to the tunable build
    (tmp_path / "m.gguf").write_bytes(b"")
    argv = ["tune", "--repo", str(tmp_path), "--model", str(tmp_path / "m.gguf"), "--site", "f",
            "-o", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert "must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [(["--budget", "nan"], "--budget and --final-minutes"),
                                            (["--final-minutes", "inf"], "--budget and --final-minutes"),
                                            (["--profile-tokens", "0"], "--profile-tokens must be"),
                                            (["--min-share", "nan"], "--min-share must be"),
                                            (["--min-share", "1.5"], "--min-share must be")])
def test_run_refuses_numbers_before_any_stage(tmp_path, extra, message):
    from amppatch.errors import UsageError
    from amppatch.run import RunOptions, resolve_options

    kwargs = {"budget": "budget_minutes", "final-minutes": "final_minutes", "profile-tokens": "profile_tokens",
              "min-share": "min_share"}
    field = kwargs[extra[0].lstrip("-")]
    value = float(extra[1]) if field != "profile_tokens" else int(extra[1])
    with pytest.raises(UsageError, match=message):
        resolve_options(RunOptions(out=tmp_path, **{field: value}))


def test_run_refuses_a_dirty_repo_before_building(tmp_path, monkeypatch):
    # its apply stage refused it only after the build, the model and the profile (minutes to an hour)
    from amppatch import build, workspace
    from amppatch.errors import UsageError
    from amppatch.run import RunOptions, resolve_options

    monkeypatch.setattr(workspace, "check_llama_tree", lambda p: Path(p))
    monkeypatch.setattr(build, "dirty_files", lambda repo: ["ggml/src/ggml-cpu/ops.cpp"])
    with pytest.raises(UsageError, match=r"has uncommitted changes: ggml/src/ggml-cpu/ops\.cpp"):
        resolve_options(RunOptions(repo=tmp_path, out=tmp_path / "o"))
    monkeypatch.setattr(build, "dirty_files", lambda repo: [])
    assert resolve_options(RunOptions(repo=tmp_path, out=tmp_path / "o")).repo == tmp_path.resolve()


@pytest.mark.parametrize("command", ["run", "tune"])
@pytest.mark.parametrize("lock", ["/proc/self/amppatch.lock", "DIR"])
def test_an_unusable_lock_is_refused_before_any_work(tmp_path, capsys, command, lock):
    lock = str(tmp_path) if lock == "DIR" else lock
    (tmp_path / "m.gguf").write_bytes(b"")
    extra = ["--repo", str(tmp_path), "--model", str(tmp_path / "m.gguf"), "--site", "f"] if command == "tune" else []
    assert main([command, "-o", str(tmp_path / "o"), "--lock", lock, *extra]) == 2
    err = capsys.readouterr().err
    assert "--lock" in err and ("virtual filesystem" in err or "is a directory" in err)
    assert not (tmp_path / "o").exists()


def test_report_checks_slices_before_rendering(tmp_path, capsys, monkeypatch):
    from amppatch import report

    def rendered(*a, **k):
        raise AssertionError("rendered before --slices was checked")

    monkeypatch.setattr(report, "render_all", rendered)
    assert main(["report", str(tmp_path), "--slices", "0"]) == 2
    assert "--slices must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("dest", ["FILE", "FILE/sub", "/proc/self/llama"])
def test_llama_fetch_refuses_an_unusable_dest_before_fetching(tmp_path, capsys, monkeypatch, dest):
    # --dest on an existing file was a NotADirectoryError traceback; under a file, git's own error (exit 4)
    from amppatch.cli import cmd_llama

    monkeypatch.setattr(cmd_llama, "fetch_llama", lambda options: pytest.fail("fetched before --dest was checked"))
    (tmp_path / "f").write_text("x")
    dest = dest.replace("FILE", str(tmp_path / "f"))
    assert main(["llama", "fetch", "--dest", dest]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amppatch: error: --dest") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["clean", "--repo", "LOOP", "--dry-run"],
    ["profile", "--repo", "TMP", "--model", "M", "--build", "LOOP", "-o", "TMP/p.json"],
    ["tune", "--repo", "TMP", "--model", "M", "--tunable-manifest", "LOOP", "-o", "TMP/o"],
])
def test_a_path_argument_that_is_a_symlink_loop_is_a_usage_error(tmp_path, small_gguf, capsys, argv):
    # Path.resolve() in clean/profile/tune raised RuntimeError("Symlink loop from ...") as a traceback
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for rel in ("CMakeLists.txt", "include/llama.h", "ggml/src/ggml-cpu/x.c"):  # a tree check_llama_tree accepts
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    names = {"LOOP": str(loop), "M": str(small_gguf)}
    argv = [names.get(a, a.replace("TMP", str(tmp_path))) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "symlink that points to itself" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sources, message", [
    (["--site", "f", "--tunable-manifest", "M"], "--site and --tunable-manifest both name the sites"),
    ([], "tune needs --profile, --site or --tunable-manifest"),
])
def test_tune_needs_one_source_of_sites(tmp_path, capsys, sources, message):
    # --profile may come with either: then it gives only the kernel shares
    (tmp_path / "m.gguf").write_bytes(b"")
    argv = ["tune", "--repo", str(tmp_path), "--model", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "o"), *sources]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
