"""Bad input files, GGUF structure, output paths and atomic writes: one clear error, nothing left behind."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amppatch import inputs
from amppatch.errors import UsageError, WriteError
from amppatch.inputs import check_gguf, check_out_dir, check_out_file, creating_dir
from amppatch.paths import write_text_atomic

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------------------
# Every reader of a JSON file, called the way its command calls it


def _read_profile(path: Path) -> object:
    from amppatch.patch import sites_from_profile

    return sites_from_profile(path, None, None)


def _read_learned(path: Path) -> object:
    from amppatch.patch import sites_from_learned

    return sites_from_learned([path])


def _read_compile_db(path: Path) -> object:
    from amppatch.source.compiledb import load_compile_db

    return load_compile_db(path)


def _read_report(path: Path) -> object:
    from amppatch.report import load_report

    return load_report(path)


def _read_run_state(path: Path) -> object:
    from amppatch.run import RunState

    return RunState(path, {})


def _read_build_manifest(path: Path) -> object:
    from amppatch.build import load_build

    return load_build(path)


def _read_apply_manifest(path: Path) -> object:
    from amppatch.tune import TuneOptions, _tunable_variant

    return _tunable_variant(TuneOptions(repo=path.parent, model=path, tunable_manifest=path))


def _read_from_profile(path: Path) -> object:
    from amppatch.tracer.overhead import calls_per_token

    return calls_per_token(path)


# reader, file name it is given, a version-1 document missing a key the reader needs (None: no schema)
READERS: dict[str, tuple[Callable[[Path], object], str, object]] = {
    "profile": (_read_profile, "profile.json", {"schema_version": 1, "sites": [{"loop": 0}]}),
    "learned": (_read_learned, "learned.json", {"schema_version": 1, "dropped": []}),
    "compile-db": (_read_compile_db, "compile_commands.json", [{"directory": "/", "command": "cc -c x.c"}]),
    "report": (_read_report, "report.json", {"schema_version": 1, "verdict": "faster", "arms": []}),
    "run-state": (_read_run_state, "run-state.json", {"schema_version": 1, "stages": []}),
    "build-manifest": (_read_build_manifest, "manifest.json", {"schema_version": 1, "key": "k"}),
    "apply-manifest": (_read_apply_manifest, "abc.json", {"schema_version": 1, "tunable": True}),
    "from-profile": (_read_from_profile, "profile.json", {"schema_version": 1, "sites": [], "trace": "t"}),
}

BAD_CONTENTS: dict[str, bytes] = {
    "binary": b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01 not text",
    "not-json": b'{"schema_version": 1, "sites": [',
    "empty": b"",
    "unknown-schema": json.dumps({"schema_version": 99, "sites": [], "winners": [], "stages": {}}).encode(),
    "no-schema": json.dumps({"sites": [], "winners": []}).encode(),
}


@pytest.mark.parametrize(("reader", "bad"), [
    (r, b) for r in sorted(READERS) for b in sorted(BAD_CONTENTS)
    if not (r == "compile-db" and b.endswith("schema"))  # CMake's compile database has no schema_version
])
def test_every_reader_refuses_a_bad_file_with_one_line(tmp_path: Path, reader: str, bad: str) -> None:
    read, name, _ = READERS[reader]
    path = tmp_path / name
    path.write_bytes(BAD_CONTENTS[bad])
    with pytest.raises(UsageError) as info:
        read(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text
    assert info.value.next_step  # says what to do
    expected = {"binary": "not a text file", "not-json": "is not JSON", "empty": "is empty",
                "unknown-schema": "schema_version 99", "no-schema": "has no schema_version"}[bad]
    assert expected in text


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_refuses_a_file_missing_keys(tmp_path: Path, reader: str) -> None:
    read, name, incomplete = READERS[reader]
    path = tmp_path / name
    path.write_text(json.dumps(incomplete))
    with pytest.raises(UsageError, match="is incomplete: it lacks `") as info:
        read(path)
    assert str(path) in str(info.value)


def test_wrong_container_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "compile_commands.json"
    path.write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(UsageError, match="expected a JSON list"):
        _read_compile_db(path)
    path = tmp_path / "learned.json"
    path.write_text("[1, 2]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        _read_learned(path)


def test_missing_paths_name_the_place() -> None:
    data = {"arms": [{"name": "A"}, {"x": 1}], "stages": [], "options": {"seed": 0}}
    assert inputs._missing(data, "arms[].name") == "arms[1].name"
    assert inputs._missing(data, "arms[0].name") is None
    assert inputs._missing({"arms": []}, "arms[0].name") == "arms[0]"
    assert inputs._missing(data, "stages{}") == "stages (an object)"
    assert inputs._missing(data, "options.model") == "options.model"
    assert inputs._missing(data, "options.seed") is None
    assert inputs._missing([{"file": "a"}, {}], "[].file") == "[1].file"


def test_the_json_files_amppatch_ships_pass_their_checks() -> None:
    # the required keys must not refuse what amppatch itself writes
    kinds = {"patches/*.json": inputs.APPLY_MANIFEST, "bench/learned/*.json": inputs.LEARNED,
             "docs/runs/*/final-report.json": inputs.REPORT, "docs/runs/*/profile.json": inputs.PROFILE}
    seen = 0
    for pattern, kind in kinds.items():
        for path in sorted(REPO.glob(pattern)):
            inputs.read_json(path, kind)
            seen += 1
    assert seen >= 6


def test_cli_report_on_a_binary_report_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    (tmp_path / "report.json").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amppatch: error:") and "not a text file" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# GGUF structure


def test_type_sizes_match_the_gguf_package() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    theirs = {int(t): tuple(v) for t, v in GGML_QUANT_SIZES.items()}
    for type_id, sizes in inputs.GGML_TYPE_SIZES.items():
        assert theirs.get(type_id) == sizes, type_id


def test_a_whole_gguf_passes(small_gguf: Path) -> None:
    header = check_gguf(small_gguf)
    size = small_gguf.stat().st_size
    assert header.version == 3 and header.n_tensors == 2 and header.file_size == size
    assert header.data_offset % header.alignment == 0
    assert header.data_offset < header.data_end <= size


@pytest.mark.parametrize("keep", ["header", "metadata", "tensor-table", "data", "one-byte-short"])
def test_a_truncated_gguf_fails_in_the_check(small_gguf: Path, keep: str) -> None:
    header = check_gguf(small_gguf)
    cut = {"header": 20, "metadata": 40, "tensor-table": header.data_offset - 40,
           "data": (header.data_offset + header.data_end) // 2, "one-byte-short": header.data_end - 1}[keep]
    data = small_gguf.read_bytes()
    small_gguf.write_bytes(data[:cut])
    with pytest.raises(UsageError) as info:
        check_gguf(small_gguf)
    text = str(info.value)
    assert str(small_gguf) in text and "\n" not in text
    assert "truncated" in text or "too few" in text


def test_gguf_info_reports_a_truncated_file_instead_of_an_index_error(small_gguf: Path) -> None:
    from amppatch.gguf_info import read_gguf

    small_gguf.write_bytes(small_gguf.read_bytes()[:-64])
    with pytest.raises(UsageError, match="truncated"):
        read_gguf(small_gguf)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "too few"),
    (b"this is a text file, not a model at all\n", "GGUF magic"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "GGUF version 1"),
    (b"GGUF\x03\x00\x00\x00" + (10**12).to_bytes(8, "little") + bytes(8), "more than"),
])
def test_foreign_files_are_not_models(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        check_gguf(path)


def test_ab_test_refuses_a_truncated_model_before_anything_runs(
        small_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    small_gguf.write_bytes(small_gguf.read_bytes()[:-1])
    out = tmp_path / "out"
    code = main(["ab-test", "--a", str(tmp_path / "no-build"), "--b", str(tmp_path / "no-build"),
                 "-m", str(small_gguf), "-o", str(out)])
    assert code == 2
    assert "truncated" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# -o


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is an existing file"):
        check_out_dir(f)
    with pytest.raises(UsageError, match="is a file, so nothing can be created"):
        check_out_dir(f / "sub")
    assert check_out_dir(tmp_path / "new" / "dir") == (tmp_path / "new" / "dir").resolve()
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_out_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        check_out_file(tmp_path)
    assert check_out_file(tmp_path / "x.json") == (tmp_path / "x.json").resolve()


@pytest.mark.parametrize("argv", [
    ["ab-test", "--a", "A", "--b", "B", "-m", "m.gguf"],
    ["run"],
    ["tune", "--repo", ".", "--model", "m.gguf", "--site", "f"],
    ["apply", "--repo", ".", "--site", "f"],
    ["profile", "--model", "m.gguf", "--repo", "."],
])
def test_every_command_refuses_an_out_that_is_a_file_before_any_work(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    target = tmp_path / "exists"
    target.write_text("precious")
    if argv[0] == "profile":  # -o is a file there: a directory is the wrong kind
        target = tmp_path / "adir"
        target.mkdir()
    assert main([*argv, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and len(err.strip().splitlines()) == 1
    assert target.is_dir() or target.read_text() == "precious"


def test_doctor_refuses_a_directory_as_its_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    assert main(["doctor", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_ab_test_refuses_an_earlier_result_without_force(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    out = tmp_path / "earlier"
    out.mkdir()
    (out / "report.json").write_text('{"kept": true}')
    base = ["ab-test", "--a", str(tmp_path / "none"), "--b", str(tmp_path / "none"), "-m",
            str(tmp_path / "missing.gguf"), "-o", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "already holds a result" in err and "--force" in err
    assert main([*base, "--force"]) == 2  # past the -o check, stopped by the missing model instead
    err = capsys.readouterr().err
    assert "missing.gguf does not exist" in err
    assert (out / "report.json").read_text() == '{"kept": true}'


def test_validation_failure_leaves_no_directory(tmp_path: Path, small_gguf: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    # the model is fine, the arms' builds do not exist: refused after -o was created, which is removed again
    out = tmp_path / "a" / "b"
    assert main(["ab-test", "--a", str(tmp_path / "none"), "--b", str(tmp_path / "none"), "-m", str(small_gguf),
                 "-o", str(out)]) == 2
    assert "not a finished amppatch build" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    out = tmp_path / "run-out"
    assert main(["run", "--repo", str(tmp_path / "no-tree"), "-o", str(out)]) == 2
    assert not out.exists()


def test_creating_dir_removes_only_what_it_created_and_only_when_empty(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), creating_dir(tmp_path / "x" / "y"):
        raise RuntimeError("validation failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), creating_dir(tmp_path / "x" / "y") as d:
        (d / "partial.json").write_text("{}")
        raise KeyboardInterrupt
    assert (tmp_path / "x" / "y" / "partial.json").is_file()  # a partial result is kept
    with creating_dir(tmp_path / "ok") as d:
        pass
    assert d.is_dir()


def test_creating_dir_without_keep_empty_removes_an_unused_directory_after_success(tmp_path: Path) -> None:
    with creating_dir(tmp_path / "a" / "b", keep_empty=False):
        pass  # e.g. an apply that found nothing to do
    assert list(tmp_path.iterdir()) == []
    with creating_dir(tmp_path / "a" / "b", keep_empty=False) as d:
        (d / "id.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "id.json").is_file()
    existing = tmp_path / "mine"
    existing.mkdir()
    with creating_dir(existing, keep_empty=False):
        pass
    assert existing.is_dir()  # not created here: left alone


def _mount_tmpfs(target: Path, options: str, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", flags, options.encode()) != 0:
        pytest.skip(f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}); needs root and CAP_SYS_ADMIN")


@pytest.fixture()
def mounted(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """Mount small tmpfs filesystems under tmp_path (through mount(2), no subprocess); unmounted after."""
    mounts: list[Path] = []

    def mount(options: str, flags: int = 0) -> Path:
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        _mount_tmpfs(target, options, flags)
        mounts.append(target)
        return target

    yield mount
    libc = ctypes.CDLL(None, use_errno=True)
    for target in reversed(mounts):
        libc.umount2(str(target).encode(), 2)  # MNT_DETACH


MS_RDONLY = 1


def test_a_read_only_out_is_refused_before_work(mounted: Callable[[str, int], Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from amppatch.cli import main

    ro = mounted("size=1m", MS_RDONLY)
    with pytest.raises(UsageError, match="read-only filesystem"):
        check_out_dir(ro / "out")
    with pytest.raises(UsageError, match="read-only filesystem"):
        check_out_file(ro / "profile.json")
    assert main(["ab-test", "--a", "A", "--b", "B", "-m", "m.gguf", "-o", str(ro / "out")]) == 2
    assert "read-only filesystem" in capsys.readouterr().err
    with pytest.raises(WriteError, match="read-only filesystem"):
        write_text_atomic(ro / "x.json", "{}")


def test_a_full_filesystem_is_refused_and_a_write_that_fills_it_leaves_nothing(
        mounted: Callable[[str, int], Path]) -> None:
    small = mounted("size=64k")
    with pytest.raises(WriteError, match="disk full") as info:
        write_text_atomic(small / "big.json", "x" * (1 << 20))
    assert str(small / "big.json") in str(info.value)
    assert list(small.iterdir()) == []
    with open(small / "filler", "wb", buffering=0) as fh, pytest.raises(OSError):
        while True:
            fh.write(b"\0" * 4096)
    with pytest.raises(UsageError, match="is full"):
        check_out_dir(small / "out")


# ----------------------------------------------------------------------------------------------------------
# Atomic writes


def test_enospc_during_an_atomic_write_leaves_no_temp_file_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    real_write_text = Path.write_text

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, data[:10])  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(WriteError) as info:
        write_text_atomic(target, "new content that does not fit")
    monkeypatch.undo()
    assert str(target) in str(info.value) and "disk full" in str(info.value)
    assert info.value.next_step and "free some space" in info.value.next_step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert target.read_text() == "old"


def test_interrupted_atomic_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Path, data: str, *args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "a.json", "{}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_onto_a_directory_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "doctor.json").mkdir()
    with pytest.raises(WriteError, match="a directory is in the way"):
        write_text_atomic(tmp_path / "doctor.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["doctor.json"]


def test_write_error_names_the_cause() -> None:
    for code, words in ((errno.ENOSPC, "disk full"), (errno.EROFS, "read-only filesystem"),
                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")):
        err = inputs.write_error(Path("/x/y.json"), OSError(code, os.strerror(code)))
        assert isinstance(err, WriteError) and "/x/y.json" in str(err) and words in str(err)



def test_good_files_of_the_kinds_not_shipped_in_the_repository_pass(tmp_path: Path) -> None:
    state = tmp_path / "run-state.json"
    state.write_text(json.dumps({"schema_version": 1, "stages": {"fetch": {"status": "done"}}}))
    assert _read_run_state(state).stages["fetch"].status == "done"  # type: ignore[attr-defined]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "source_dir": str(tmp_path)}))
    assert _read_build_manifest(manifest).source_dir == tmp_path  # type: ignore[attr-defined]
    db = tmp_path / "compile_commands.json"
    db.write_text(json.dumps([{"directory": "/b", "file": "/s/x.c", "arguments": ["cc", "-c", "/s/x.c"]}]))
    assert _read_compile_db(tmp_path) == json.loads(db.read_text())  # a build dir works too


def test_an_out_on_a_virtual_filesystem_is_refused() -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    with pytest.raises(UsageError, match="virtual filesystem"):
        check_out_file(Path("/proc/profile.json"))


def test_report_given_a_file_that_is_not_report_json(tmp_path: Path) -> None:
    other = tmp_path / "bin.json"
    other.write_text("{}")
    with pytest.raises(UsageError, match="is a file, not an ab-test directory"):
        _read_report(other)


def test_report_samples_without_their_fields_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `report --slices` rebuilds every raw sample: a sample cut short was a TypeError traceback
    from amppatch.cli import main

    report = {"schema_version": 1, "verdict": "faster",
              "options": {"model": "m", "reps": 3, "seed": 0, "min_effect": 0.05},
              "settings": [{"id": "s", "label": "l", "test": "tg", "threads": 1, "n_tokens": 64}],
              "arms": [{"name": "A", "build_dir": "/x"}, {"name": "B", "build_dir": "/y"}],
              "comparisons": [{"arm": "B", "setting": "s", "baseline": "A"}],
              "samples": [{"arm": "A"}, 5]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path), "--slices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks `samples[0].round`" in err and len(err.splitlines()) == 1


def test_a_gguf_without_tensors_is_not_a_model(tmp_path: Path) -> None:
    # structurally whole, but llama-bench fails on it: refused before a profile or an ab-test runs it
    path = tmp_path / "vocab.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    with pytest.raises(UsageError, match="holds no tensors"):
        inputs.check_gguf(path)
    assert inputs.check_gguf(path, weights=False).n_tensors == 0


def test_a_header_cut_right_after_its_counts_is_called_truncated(small_gguf: Path, tmp_path: Path) -> None:
    # was "not a usable GGUF file: its header claims 3 tensors ... more than 100 bytes can hold" for a cut download
    small_gguf.write_bytes(small_gguf.read_bytes()[:30])
    with pytest.raises(UsageError, match="is truncated: its header lists"):
        check_gguf(small_gguf)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62))
    with pytest.raises(UsageError, match="not a usable GGUF file: its header claims"):
        check_gguf(garbage)


@pytest.mark.parametrize("check", [check_out_dir, check_out_file])
def test_an_output_that_is_a_symlink_loop_is_one_usage_line(tmp_path: Path, check: Callable[..., Path]) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # was a RuntimeError("Symlink loop") traceback
    with pytest.raises(UsageError, match="cannot be resolved"):
        check(loop)


def test_an_arm_with_an_unbalanced_quote_is_one_usage_line() -> None:
    from amppatch.abtest import parse_arm

    with pytest.raises(UsageError, match="not valid shell words"):
        parse_arm("/b::-p 'x", name="B")


def test_an_interrupted_profile_leaves_no_partial_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch.profile import ProfileOptions, profile, stage

    out = tmp_path / "p.json"

    def interrupted(options: object, build: object, argv: object, linkage: object) -> None:
        (tmp_path / "p.trace").mkdir()
        (tmp_path / "p.trace" / "trace.bin").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "prepare_workload", lambda options: (None, ["prog"], "dynamic"))
    monkeypatch.setattr("amppatch.machine.probe_machine", lambda: object())
    monkeypatch.setattr(stage, "run_workload", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile(ProfileOptions(command=("prog",), out=out))
    assert list(tmp_path.iterdir()) == []
