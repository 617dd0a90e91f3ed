"""Checks of what a command reads and where it writes, done before any work.

Every JSON file amppatch reads (profile.json, learned.json, report.json, run-state.json, a build's or an
apply's manifest, compile_commands.json) goes through ``read_json`` with its ``JsonKind``: a file that is not
UTF-8, not JSON, of another or unknown ``schema_version``, or that lacks a key the reader uses is refused with
one line naming the file and what to pass instead — never a traceback from deep inside a reader.

Every model goes through ``check_gguf`` first: header, key/value table and tensor table are walked with
bounds checks, and the tensor data's extent is compared with the file size, so a truncated or foreign file
fails in milliseconds instead of after a build or a llama-bench run.

``check_out_dir``/``check_out_file`` refuse an unusable ``-o`` (an existing file where a directory is meant,
a read-only or full filesystem, an earlier ab-test result) before anything runs, and ``creating_dir`` removes
the directories a failed command created while they are still empty.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amppatch.errors import UsageError, WriteError

# ----------------------------------------------------------------------------------------------------------
# JSON inputs


@dataclass(frozen=True)
class JsonKind:
    """One kind of JSON file: what it is called, what writes it, its schema version (None: the format has
    none, e.g. CMake's compile database), the keys its readers use, and its top-level container."""

    name: str
    producer: str
    schema_version: int | None
    required: tuple[str, ...] = ()
    container: type[dict[str, Any]] | type[list[Any]] = dict
    advice: str = ""  # what to do instead, where "pass another one" is not the answer
    older_versions: tuple[int, ...] = ()  # earlier schema versions this amppatch still reads

    @property
    def versions(self) -> tuple[int, ...]:
        """Every schema_version a reader accepts, oldest first."""
        return (*self.older_versions, self.schema_version) if self.schema_version is not None else ()

    @property
    def next_step(self) -> str:
        return self.advice or f"pass a {self.name} written by {self.producer}"


PROFILE = JsonKind("profile.json", "`amppatch profile`", 1, ("sites[].function",))
# learned.json 2 adds the kernel shares, the budget split and the joint verification; 1 is still read
LEARNED = JsonKind("learned.json", "`amppatch tune`", 2,
                   ("winners[].function", "winners[].distance_bytes", "winners[].hint"), older_versions=(1,))
REPORT = JsonKind("report.json", "`amppatch ab-test`", 1, (
    "verdict", "options.model", "options.reps", "options.seed", "options.min_effect",
    "settings[].id", "settings[].label", "settings[].test", "settings[].threads", "settings[].n_tokens",
    "arms[0].name", "arms[].name", "arms[].build_dir", "comparisons[].arm", "comparisons[].setting",
    "comparisons[].baseline", "samples[]",
    # every field of a raw sample: `report --slices` rebuilds each one
    "samples[].round", "samples[].block", "samples[].slot", "samples[].arm", "samples[].setting",
    "samples[].rep", "samples[].ns", "samples[].n_tokens",
))
RUN_STATE = JsonKind("run-state.json", "`amppatch run`", 1, ("stages{}",),
                     advice="it records an earlier `amppatch run` in that directory: pass another -o, or delete "
                            "the file to start that run over")
BUILD_MANIFEST = JsonKind("build manifest.json", "`amppatch build`", 1, ("source_dir",))
APPLY_MANIFEST = JsonKind("apply manifest", "`amppatch apply`", 1, ("sites[]",))
COMPILE_DB = JsonKind("compile_commands.json", "CMake with CMAKE_EXPORT_COMPILE_COMMANDS=ON", None, ("[].file",),
                      container=list)


def read_text(path: Path, *, what: str, next_step: str) -> str:
    """A UTF-8 text file, or a UsageError naming it and what to pass instead."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist", next_step=next_step) from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a file", next_step=next_step) from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}", next_step=next_step) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not a text file (byte {exc.start} is not UTF-8)",
                         next_step=next_step) from None


def _missing(data: Any, spec: str) -> str | None:
    """The first place where `data` lacks what `spec` asks for, or None. Spec: dotted keys; `key[]` means a
    list (every element is checked against the rest), `key[N]` its N-th element, `key{}` a dict."""
    nodes: list[tuple[str, Any]] = [("", data)]
    for part in spec.split("."):
        key, _, suffix = part.partition("[")
        if key.endswith("{}"):
            key, suffix = key[:-2], "{}"
        else:
            suffix = "[" + suffix if suffix else ""
        nxt: list[tuple[str, Any]] = []
        for where, node in nodes:
            if key:
                if not isinstance(node, dict) or key not in node:
                    return f"{where}.{key}".lstrip(".")
                where, node = f"{where}.{key}".lstrip("."), node[key]
            if suffix == "{}":
                if not isinstance(node, dict):
                    return f"{where} (an object)"
                nxt.append((where, node))
            elif suffix == "[]":
                if not isinstance(node, list):
                    return f"{where}[] (a list)"
                nxt.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
            elif suffix:
                index = int(suffix.strip("[]"))
                if not isinstance(node, list) or len(node) <= index:
                    return f"{where}[{index}]"
                nxt.append((f"{where}[{index}]", node[index]))
            else:
                nxt.append((where, node))
        nodes = nxt
    return None


def check_json(data: Any, path: Path, kind: JsonKind, require: Sequence[str] = ()) -> Any:
    """`data` (parsed from `path`) checked against `kind`: container, schema_version, required keys."""
    from amppatch import __version__

    if not isinstance(data, kind.container):
        shape = "a JSON list" if kind.container is list else "a JSON object"
        raise UsageError(f"{path} is not a {kind.name} (expected {shape})", next_step=kind.next_step)
    if kind.schema_version is not None:
        version = data.get("schema_version") if isinstance(data, dict) else None  # only objects carry one
        if version is None:
            raise UsageError(f"{path} has no schema_version", next_step=kind.next_step)
        if isinstance(version, bool) or version not in kind.versions:
            read = " or ".join(str(v) for v in kind.versions)
            raise UsageError(f"{path} has schema_version {version!r}; amppatch {__version__} reads {kind.name} "
                             f"schema_version {read}",
                             next_step=kind.advice or f"regenerate it with this amppatch's {kind.producer}, or "
                                                      "use the amppatch version that wrote it")
    for spec in (*kind.required, *require):
        where = _missing(data, spec)
        if where is not None:
            raise UsageError(f"{path} is incomplete: it lacks `{where}`",
                             next_step=kind.advice or f"regenerate it with {kind.producer} (it may have been cut "
                                                      "short or edited)")
    return data


def check_schema_version(data: dict[str, Any], expected: int, *, what: str, next_step: str) -> None:
    """The schema_version of a document nested in another (a doctor.json section, one roofline result),
    checked as a file's is: anything but the version this amppatch reads is one usage line."""
    version = data.get("schema_version")
    if isinstance(version, bool) or version != expected:
        raise UsageError(f"{what} has schema_version {version}; this amppatch reads {expected}", next_step=next_step)


def read_json(path: Path, kind: JsonKind, *, require: Sequence[str] = ()) -> Any:
    """Read and check one JSON input file; every failure is one UsageError line naming the file."""
    path = Path(path).expanduser()
    text = read_text(path, what=kind.name, next_step=kind.next_step)
    if not text.strip():
        raise UsageError(f"{kind.name} {path} is empty", next_step=kind.next_step)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{kind.name} {path} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                         next_step=kind.next_step) from None
    except RecursionError:
        raise UsageError(f"{kind.name} {path} is nested too deeply to be a {kind.name}",
                         next_step=kind.next_step) from None
    return check_json(data, path, kind, require)


# ----------------------------------------------------------------------------------------------------------
# GGUF models

# ggml type id -> (elements per block, bytes per block); ggml's own table (gguf-py GGML_QUANT_SIZES), kept
# here so the check needs neither numpy nor the gguf package's import time. A type missing here (newer than
# this table) is not sized; its tensor is still checked to start inside the file.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # llama.cpp refuses v1
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_MAX_DIMS = 4
_DEFAULT_ALIGNMENT = 32
# Counts a real model's header can have (a 405B model has ~1.1k tensors, MoE models some 10k): a file with
# such counts and too few bytes for them is a cut download, larger counts are garbage.
_PLAUSIBLE_KV, _PLAUSIBLE_TENSORS = 1 << 16, 1 << 20


@dataclass(frozen=True)
class GgufHeader:
    """What the structural check saw: enough to say the file is whole."""

    path: Path
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_offset: int  # where tensor data starts
    data_end: int  # end of the last tensor's data (bytes the file must hold)
    file_size: int


class _Truncated(Exception):
    pass


class _Bad(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads from a mapped file."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated(f"the header is cut off at byte {self.size} (reading byte {self.pos})")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise _Truncated(f"{what} of {n} bytes at byte {self.pos} runs past the end of the file ({self.size})")
        value = self.buf[self.pos:self.pos + n]
        self.pos += n
        return value

    def skip_value(self, vtype: int, what: str) -> Any:
        """Skip one value (returning scalars, which is all the check needs)."""
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            self.string(what)
            return None
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALAR:
                n = struct.calcsize(_SCALAR[etype]) * count
                if self.pos + n > self.size:
                    raise _Truncated(f"{what}: an array of {count} values runs past the end of the file")
                self.pos += n
                return None
            if etype == _STRING:
                if count * 8 > self.size - self.pos:
                    raise _Truncated(f"{what}: an array of {count} strings runs past the end of the file")
                # A vocabulary holds 10^5 strings: one tight loop over lengths (positions only grow, so a
                # length past the end is caught by the next bound check or the final one).
                unpack, buf, pos, size = _U64.unpack_from, self.buf, self.pos, self.size
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Truncated(f"{what}: an array of {count} strings runs past the end of the file")
                    pos += 8 + unpack(buf, pos)[0]
                if pos > size:
                    raise _Truncated(f"{what}: a string runs past the end of the file")
                self.pos = pos
                return None
            if etype == _ARRAY:
                if count * 12 > self.size - self.pos:
                    raise _Truncated(f"{what}: an array of {count} arrays runs past the end of the file")
                for _ in range(count):
                    self.skip_value(_ARRAY, what)
                return None
            raise _Bad(f"{what}: arrays of value type {etype} are not valid GGUF")
        raise _Bad(f"{what}: unknown value type {vtype}")


def _walk_gguf(buf: mmap.mmap, path: Path, size: int) -> GgufHeader:
    cur = _Cursor(buf, size)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise _Bad(f"it does not start with the GGUF magic (found {magic!r})")
    cur.pos = 4
    version = cur.take("<I")
    if version not in GGUF_VERSIONS:
        if version & 0xFFFFFF == 0 and version >> 24 in GGUF_VERSIONS:
            raise _Bad("it is a big-endian GGUF; this machine's llama.cpp reads little-endian files")
        raise _Bad(f"GGUF version {version} is not one llama.cpp reads ({', '.join(map(str, GGUF_VERSIONS))})")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # Each key/value pair takes at least 12 bytes and each tensor entry at least 24: larger counts are garbage.
    if n_kv * 12 > size or n_tensors * 24 > size:
        if n_kv <= _PLAUSIBLE_KV and n_tensors <= _PLAUSIBLE_TENSORS:  # a real model's header, cut short
            raise _Truncated(f"its header lists {n_tensors} tensors and {n_kv} metadata keys, but the file ends "
                             f"at byte {size}")
        raise _Bad(f"its header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                   f"{size} bytes can hold")
    alignment = _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.take("<I")
        value = cur.skip_value(vtype, f"metadata {key.decode(errors='replace')!r}")
        if key == b"general.alignment":
            if vtype != 4 or not value or value & (value - 1):
                raise _Bad(f"general.alignment {value!r} is not a power of two (uint32)")
            alignment = int(value)
    tensors: list[tuple[str, int, int | None]] = []  # name, offset, bytes (None: unknown type)
    for i in range(n_tensors):
        name = cur.string(f"tensor {i}'s name").decode(errors="replace")
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (ggml has 1 to {_MAX_DIMS})")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        ttype, offset = cur.take("<I"), cur.take("<Q")
        if offset % alignment:
            raise _Bad(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        n_bytes = None
        if ttype in GGML_TYPE_SIZES:
            block, block_bytes = GGML_TYPE_SIZES[ttype]
            if dims[0] % block:
                raise _Bad(f"tensor {name!r}: row length {dims[0]} is not a multiple of its type's block ({block})")
            n_elements = 1
            for d in dims:
                n_elements *= d
            n_bytes = n_elements // block * block_bytes
        tensors.append((name, offset, n_bytes))
    data_offset = -(-cur.pos // alignment) * alignment
    data_end = cur.pos  # a vocabulary-only file ends with its header (no padding)
    for name, offset, n_bytes in tensors:
        end = data_offset + offset + (1 if n_bytes is None else n_bytes)  # unknown type: must start inside
        if end > size:
            missing = end - size
            raise _Truncated(f"tensor {name!r} needs bytes up to {end} but the file ends at {size} "
                             f"({missing} bytes missing)")
        data_end = max(data_end, end)
    return GgufHeader(path, version, n_tensors, n_kv, alignment, data_offset, data_end, size)


def check_gguf(path: Path, *, what: str = "model", weights: bool = True) -> GgufHeader:
    """A structural check of a GGUF model (milliseconds: the tensor data is not read, only its extent is
    compared with the file size). Raises one UsageError line saying what is wrong and what to do. With
    `weights` (every model amppatch runs), a file without tensors — a vocabulary-only GGUF such as llama.cpp's
    models/ggml-vocab-*.gguf — is refused too: llama.cpp cannot load it as a model."""
    path = Path(path).expanduser()
    step = "pass a whole .gguf file (re-download or re-copy it, or make one with `amppatch model synth`)"
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist", next_step=step)
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a file", next_step=step)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise UsageError(f"{what} {path} is not a GGUF file: {size} bytes are too few for a GGUF header",
                                 next_step=step)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _walk_gguf(buf, path.resolve(), size)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}", next_step=step) from None
    except _Truncated as exc:
        raise UsageError(f"{what} {path} is truncated: {exc}", next_step=step) from None
    except _Bad as exc:
        raise UsageError(f"{what} {path} is not a usable GGUF file: {exc}", next_step=step) from None
    if weights and header.n_tensors == 0:
        raise UsageError(f"{what} {path} holds no tensors (a vocabulary-only GGUF?), so llama.cpp cannot run it",
                         next_step=step)
    return header


# ----------------------------------------------------------------------------------------------------------
# Outputs


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(directory: Path, flag: str, target: Path) -> None:
    """`directory` (where `target` goes; it may not exist yet) accepts new files: not under a file, not on a
    read-only, virtual or full filesystem, writable by this user."""
    anchor = _nearest_existing(directory)
    if not anchor.is_dir():
        raise UsageError(f"{flag} {target}: {anchor} is a file, so nothing can be created under it",
                         next_step=f"pass another {flag}")
    try:
        st = os.statvfs(anchor)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot inspect {anchor}: {exc.strerror}",
                         next_step=f"pass another {flag}") from None
    if st.f_blocks == 0:  # procfs, sysfs: kernel views that hold no files of ours
        raise UsageError(f"{flag} {target} is on a virtual filesystem ({anchor}) that cannot hold files",
                         next_step=f"pass an {flag} on a real filesystem")
    if st.f_flag & os.ST_RDONLY:
        raise UsageError(f"{flag} {target} is on a read-only filesystem ({anchor})",
                         next_step=f"pass a writable {flag}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: {anchor} is not writable by this user",
                         next_step=f"pass a writable {flag} (or fix the permissions)")
    free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    if free_blocks == 0:
        raise UsageError(f"{flag} {target}: the filesystem of {anchor} is full",
                         next_step=f"free some space, or pass an {flag} on another filesystem")


def _resolve_out(path: Path, flag: str) -> Path:
    """`path` made absolute with symlinks resolved; a symlink loop (RuntimeError before Python 3.13, OSError
    after) is one usage line."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise UsageError(f"{flag} {path} cannot be resolved: {getattr(exc, 'strerror', None) or exc}",
                         next_step=f"pass another {flag} (is it a symlink that points to itself?)") from None


def check_out_dir(path: Path, *, flag: str = "-o", result_file: str | None = None, force: bool = False,
                  command: str = "") -> Path:
    """An output directory, resolved and checked before any work: not an existing regular file, creatable and
    writable, and — with `result_file` — not an earlier result (the file there) unless `force`."""
    path = _resolve_out(path, flag)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; {flag} names a directory",
                         next_step=f"pass a new or existing directory as {flag}")
    if result_file is not None and (path / result_file).exists() and not force:
        raise UsageError(f"{flag} {path} already holds a result ({result_file}) of an earlier {command or 'run'}",
                         next_step=f"pass another {flag}, or add --force to overwrite it")
    _check_writable(path, flag, path)
    return path


def check_out_file(path: Path, *, flag: str = "-o", example: str = "NAME.json") -> Path:
    """An output file path, resolved and checked before any work: not a directory, its directory creatable
    and writable."""
    path = _resolve_out(path, flag)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; {flag} names the file to write",
                         next_step=f"pass a file path, e.g. {flag} {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and is not writable", next_step=f"pass another {flag}")
    _check_writable(path.parent, flag, path)
    return path


def write_error(path: Path, exc: OSError, what: str = "write") -> WriteError:
    """The one-line error for a failed write of `path`, naming the cause in words."""
    reasons = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only filesystem",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "a directory is in the way", errno.ENOTDIR: "a file is in the way"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    step = ("free some space, then rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "pass another output path (-o), or fix the permissions, then rerun")
    return WriteError(f"cannot {what} {path}: {reason}", next_step=step)


@contextmanager
def creating_dir(path: Path, *, keep_empty: bool = True) -> Iterator[Path]:
    """Create `path` (and missing parents) for a command's output; if the command fails, remove the
    directories created here that are still empty, so a failed command leaves nothing behind. With
    `keep_empty=False` they are removed after success too when the command wrote nothing into them (an apply
    that had nothing to do)."""
    path = Path(path)
    created: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc, "create") from None
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise
    if not keep_empty:
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break  # not empty (a partial result is kept) or gone
