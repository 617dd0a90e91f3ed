"""The apply stage: options in, plan → render → edit → commit/export → build A and B → gate, result out
(the steps live in the sibling modules; this one orders them and owns the manifest)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from amppatch import __version__
from amppatch.build import BuildOptions
from amppatch.errors import AmppatchError, BuildError, UsageError
from amppatch.gate_sites import breakpoint_locations, gate_sites
from amppatch.machine import cpu_model
from amppatch.patch.gitrepo import BRANCH_PREFIX, GitRepo, check_export, commit_message, request_id
from amppatch.patch.levers import LeverEdit
from amppatch.patch.manifest import ApplyManifest
from amppatch.patch.plan import (
    Plan,
    PlannedSite,
    SiteRequest,
    Skipped,
    analyze_requests,
    cache_line_size,
    parse_site_spec,
    plan_sites,
    sites_from_learned,
    sites_from_profile,
)
from amppatch.patch.render import FileChange, build_changes, unified_diff
from amppatch.paths import cache_dir, write_text_atomic
from amppatch.proc import progress
from amppatch.source import find_function_files, split_member, split_specialization

if TYPE_CHECKING:
    from amppatch.build import Build

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ApplyOptions:
    repo: Path
    sites: tuple[str, ...] = ()
    profile: Path | None = None
    # learned.json files from `amppatch tune`: their winners, baked in as constants
    learned: tuple[Path, ...] = ()
    distance: int | None = None  # overrides every site's distance (manual default DEFAULT_DISTANCE)
    hint: int | None = None
    tunable: bool = False
    dry_run: bool = False
    build: bool = True
    # Options both arms are built with (ref and name are set per arm); None = the build layer's defaults.
    build_options: BuildOptions | None = None
    like: Path | None = None  # the build whose options build_options copies (its compile db serves --no-build)
    out: Path | None = None
    compile_db: Path | None = None
    gate: bool = True
    gate_model: Path | None = None
    gate_type: str | None = None  # synthetic type gating sites of no weight type (gate_sites.gate_groups)
    gate_args: tuple[str, ...] = ()
    line_size: int | None = None  # cache line size; None = this machine's (sysfs), else 64
    # the huge-page lever (amppatch.pages): the weights' mapping on file-backed THP, in the same commit
    hugepages: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.learned, (str, Path)):  # one file given the pre-tuple way
            object.__setattr__(self, "learned", (Path(self.learned),))


@dataclass
class ApplyResult:
    id: str | None
    branch: str | None
    commit: str | None
    base_commit: str
    manifest_path: Path | None
    patch_path: Path | None
    diff: str
    sites: list[PlannedSite]
    skipped: list[Skipped]
    warnings: list[str]
    builds: dict[str, str] = field(default_factory=dict)
    gate: dict | None = None
    reused: bool = False
    manifest: ApplyManifest | None = None  # the <id>.json as written (its `path` is manifest_path)
    levers: list[LeverEdit] = field(default_factory=list)  # the levers this patch carries


def _resolve_requests(options: ApplyOptions) -> tuple[list[SiteRequest], list[dict]]:
    """The sites to patch and the files they came from (profile.json or learned.json files, for provenance)."""
    if options.profile is not None and options.sites:
        raise UsageError("pass either --profile or --site, not both", next_step="choose one source of sites")
    if options.learned:
        if options.profile is not None or options.sites:
            raise UsageError("--learned brings its own sites; it cannot be combined with --profile or --site",
                             next_step="pass only --learned learned.json")
        if options.distance is not None or options.hint is not None or options.tunable:
            raise UsageError("--learned bakes the tuned distance and hint as constants; --distance, --hint and "
                             "--tunable do not apply", next_step="drop them (or edit learned.json's winners)")
        return sites_from_learned(options.learned)
    if options.profile is not None:
        requests, profile = sites_from_profile(options.profile, options.distance, options.hint)
        return requests, [profile.to_json()]
    if not options.sites:
        if not options.hugepages:
            raise UsageError("no sites given", next_step="pass --site FUNCTION[:LOOP[:STREAM]], --profile "
                                                         "profile.json, --learned learned.json or --hugepages")
        if options.distance is not None or options.hint is not None or options.tunable:
            raise UsageError("--distance, --hint and --tunable set prefetch sites; --hugepages alone has none",
                             next_step="add --site/--profile, or drop them")
        return [], []  # the lever alone
    return [parse_site_spec(s, options.distance, options.hint) for s in options.sites], []


def _configure_compile_db(repo: Path, base: str, options: ApplyOptions) -> Path:
    """The compile commands of the baseline build with the arms' options: from its cached build when one
    exists, else from CMake's configure step alone (seconds) with the arms' CMake options, for the
    (seconds). The repo is only read; output goes to the cache."""
    from amppatch.build import resolve
    from amppatch.proc import require_tool, run

    template = _build_options(options, repo, base, "compile commands")
    resolved = resolve(template)
    built = cache_dir("builds") / resolved.key
    if (built / "manifest.json").is_file() and (built / "compile_commands.json").is_file():
        return built / "compile_commands.json"  # the baseline with these options was built before
    key = hashlib.sha256(json.dumps([resolved.key, "configure-only"]).encode()).hexdigest()[:16]
    out = cache_dir("builds") / f"configure-{key}"
    db = out / "compile_commands.json"
    if db.is_file():
        return db
    cmake = require_tool("cmake", install_hint="install CMake (apt-get install -y cmake)")
    defines = [f"-D{k}={v}" for k, v in resolved.cmake_options.items()]
    flags = " ".join(filter(None, [resolved.cflags, *resolved.kernel_flags()]))
    if flags:
        defines += [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    progress(f"apply: no build of {base[:12]} to take compile commands from; running CMake configure only ...")
    with tempfile.TemporaryDirectory(prefix="configure-", dir=cache_dir("builds")) as tmp:
        run([cmake, "-S", str(repo), "-B", tmp, *defines], timeout=600, what="cmake configure (compile commands)",
            next_step="pass --compile-db from a build of this tree instead")
        written = Path(tmp) / "compile_commands.json"
        if not written.is_file():  # a CMakeLists that declares no targets: checked before the cache dir exists
            raise UsageError(f"CMake configured {repo} but wrote no compile_commands.json (no C/C++ targets?)",
                             next_step="pass --compile-db from a build of this tree, or check that it is llama.cpp")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, db)
    return db


def _build_options(options: ApplyOptions, repo: Path, ref: str, name: str) -> BuildOptions:
    """Identical options for both arms: only the ref (and the human label) differ."""
    template = options.build_options or BuildOptions(repo=repo)
    return replace(template, repo=repo, ref=ref, name=name)


def apply(options: ApplyOptions) -> ApplyResult:
    """Run the whole apply stage (see the package docstring)."""
    from amppatch.workspace import check_llama_tree

    repo = check_llama_tree(options.repo)
    git = GitRepo(repo)
    base = _clean_base(git, repo)
    requests, sources = _resolve_requests(options)
    warnings = _provenance_warnings(options, sources, base)
    _check_functions_exist(repo, requests)
    line_size = options.line_size or cache_line_size()
    levers = _levers(options, repo, warnings)  # before any build: a tree without the mapping fails fast

    build_a = None
    if options.build and not options.dry_run:
        from amppatch.build import build

        progress("apply: building the baseline (A) ...")
        build_a = build(_build_options(options, repo, base, "A (baseline)"))
    if requests:
        plan = _plan(repo, requests, _compile_db(options, repo, base, build_a), line_size, warnings)
        changes, applied = build_changes(plan, repo, tunable=options.tunable, line_size=line_size)
    else:
        plan, changes, applied = Plan([], [], {}, warnings), [], []
        for w in warnings:
            progress(f"apply: warning: {w}")
    clash = {c.relpath for c in changes} & {lv.change.relpath for lv in levers}
    if clash:
        raise AmppatchError(f"a prefetch site and a lever both edit {', '.join(sorted(clash))}",
                            next_step="apply the lever and the sites in separate requests")
    changes += [lv.change for lv in levers]
    diff = unified_diff(changes)
    result = ApplyResult(None, None, None, base, None, None, diff, applied, plan.skipped, plan.warnings,
                         levers=levers)
    if options.dry_run:
        return result
    if not changes:
        progress("apply: the tree already carries everything asked for; nothing to do")
        return result
    rid = request_id(base, applied, tunable=options.tunable, line_size=line_size, levers=levers)
    branch = f"{BRANCH_PREFIX}{rid}"
    out_dir = Path(options.out or Path.cwd() / "amppatch-out").expanduser().resolve()
    patch_path, manifest_path = out_dir / f"{rid}.patch", out_dir / f"{rid}.json"
    result.id, result.branch = rid, branch
    created = _commit(git, repo, result, changes, tunable=options.tunable)
    lever_files = {lv.change.relpath: lv.file_entry() for lv in levers}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": "amppatch",
        "tool_version": __version__,
        "id": rid,
        "branch": branch,
        "base_commit": base,
        "commit": result.commit,
        "repo": str(repo),
        "tunable": options.tunable,
        "line_size": line_size,
        "options": _options_json(options),
        "sites": [s.to_dict(tunable=options.tunable) for s in applied],
        "skipped": [s.to_dict() for s in plan.skipped],
        "warnings": plan.warnings,
        "files": [lever_files.get(c.relpath) or {"path": c.relpath, "inserted_lines": c.inserted_lines}
                  for c in changes],
        "levers": [lv.name for lv in levers],
        "patch": patch_path.name,
    }
    try:
        # Checked before anything is built or written: the exported pair must agree line for line.
        patch_text = git.format_patch(str(result.commit))
        problems = check_export(patch_text, manifest)
        if problems:
            raise AmppatchError(f"the patch of {branch} does not match its manifest: " + "; ".join(problems),
                                next_step="nothing was exported; report this with the branch "
                                          f"(`git -C {repo} show {branch}`)")
        if build_a is not None:
            _build_and_gate(options, repo, build_a, result, manifest, changes)
        if manifest_path.is_file() and result.reused:
            _carry_over(manifest_path, manifest)
        if levers and "hugepages" not in manifest:
            from amppatch.pages import share_record, thp_enabled_mode

            why = "apply ran with --no-gate" if build_a is not None else "apply ran with --no-build"
            manifest["hugepages"] = share_record(thp_enabled_mode(), None, None,
                                                 not_measured=f"{why}: the huge-page share was not measured")
        write_text_atomic(patch_path, patch_text)
        text = json.dumps(manifest, indent=2, default=str) + "\n"
        write_text_atomic(manifest_path, text)
    except (AmppatchError, KeyboardInterrupt):  # Ctrl-C during the builds leaves no branch either
        if created:
            git.delete_branch(branch)
            progress(f"apply: removed branch {branch}")
        for p in (patch_path, manifest_path):
            p.unlink(missing_ok=True)
        raise
    result.manifest_path, result.patch_path = manifest_path, patch_path
    result.manifest = ApplyManifest.from_json(json.loads(text), manifest_path)  # the document as written
    return result


def _clean_base(git: GitRepo, repo: Path) -> str:
    """The commit apply builds on; a tree with uncommitted changes is refused (they would not be in it)."""
    dirty = git.dirty_files()
    if dirty:
        shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
        raise UsageError(f"{repo} has uncommitted changes: {shown}",
                         next_step="commit or stash them first; apply commits on its own branch from a clean tree")
    return git.head_commit()


def _provenance_warnings(options: ApplyOptions, sources: list[dict], base: str) -> list[str]:
    """Warnings that the profile or tune results were measured on another CPU or another commit."""
    warnings: list[str] = []
    what = "tune result" if options.learned else "profile"
    names = [str(p) for p in options.learned] if options.learned else [str(options.profile)]
    ours = cpu_model()
    for name, source in zip(names, sources, strict=False):
        theirs = (source.get("machine") or {}).get("cpu_model")
        if theirs and ours and theirs != ours:
            warnings.append(f"the {what} {name} was measured on {theirs!r}, this CPU is {ours!r}: its distances and "
                            f"hints may not fit here (re-{'tune' if options.learned else 'profile'} on this machine)")
        learned_base = source.get("base_commit") if options.learned else None
        if learned_base and learned_base != base:
            warnings.append(f"{name} was tuned on commit {learned_base[:12]}, the tree is at {base[:12]}: "
                            "the kernels may have changed (re-tune)")
    return list(dict.fromkeys(warnings))  # the same learned.json passed twice warns once


def _levers(options: ApplyOptions, repo: Path, warnings: list[str]) -> list[LeverEdit]:
    """The levers' edits of the tree (the huge-page lever with --hugepages); one the tree already carries
    is left alone, with a warning."""
    if not options.hugepages:
        return []
    from amppatch.pages import hugepages_lever

    lever = hugepages_lever(repo)
    if lever is None:
        warnings.append("hugepages: the tree already carries the huge-page lever; unchanged")
        return []
    return [lever]


def _check_functions_exist(repo: Path, requests: list[SiteRequest]) -> None:
    """Fail fast, before any build, on a function that does not exist."""
    for req in requests:
        owner, member = split_member(req.function)
        if not find_function_files(repo, member if owner is not None else split_specialization(member)[0]):
            raise UsageError(f"{req.function} is not mentioned anywhere under {repo}/ggml/src/ggml-cpu",
                             next_step="check the name; `amppatch profile` lists the hot kernels")


def _compile_db(options: ApplyOptions, repo: Path, base: str, build_a: Build | None) -> Path:
    """The compile commands that decide which #if branches are live: given, else the baseline build's,
    else the --like build's, else a configure-only run's."""
    compile_db = options.compile_db
    if build_a is not None:
        compile_db = compile_db or (build_a.dir / "compile_commands.json")
    if compile_db is None and options.like is not None:
        candidate = Path(options.like) / "compile_commands.json"
        compile_db = candidate if candidate.is_file() else None
    if compile_db is None:
        compile_db = _configure_compile_db(repo, base, options)
    return compile_db


def _plan(repo: Path, requests: list[SiteRequest], compile_db: Path, line_size: int, warnings: list[str]) -> Plan:
    """Analyze and plan; reports what was skipped and why, and refuses a plan with nothing to patch."""
    progress(f"apply: deciding live #if branches with {compile_db}")
    analyses = analyze_requests(repo, requests, compile_db)
    plan = plan_sites(requests, analyses, line_size)
    plan.warnings[:0] = warnings
    for fa in {id(fa): fa for fa in analyses.values()}.values():  # a wrapper and its callee share one
        plan.warnings.extend(f"{fa.function}: {w}" for w in fa.warnings)
    for sk in plan.skipped:
        progress(f"apply: skipped {sk.request.describe()}: {sk.reason}")
    for w in plan.warnings:
        progress(f"apply: warning: {w}")
    if not plan.sites:
        raise UsageError("no site could be patched (see the reasons above)",
                         next_step="pick a live loop with --site FUNCTION:LOOP:STREAM (apply --dry-run lists them)")
    return plan


def _commit(git: GitRepo, repo: Path, result: ApplyResult, changes: list[FileChange], *, tunable: bool) -> bool:
    """Commit the changes on `result.branch` (sets `result.commit`, `result.reused`); True if the branch
    was created by this call (so a later failure removes it)."""
    assert result.id is not None and result.branch is not None
    rid, branch, base = result.id, result.branch, result.base_commit
    # The commit is deterministic (fixed identity, the base's date), so the one this request makes can be
    # written to the object database and compared with an existing branch: a branch someone reset, amended
    # or committed to would otherwise be exported and built as if it held this request.
    commit = git.make_commit(base, {c.relpath: c.after for c in changes},
                             commit_message(rid, base, result.sites, tunable=tunable, levers=result.levers))
    existing = git.branch_commit(branch)
    created = False
    if existing is not None:
        if existing != commit:
            raise UsageError(f"branch {branch} exists but does not hold this request: "
                             f"{git.branch_mismatch(existing, commit, base)} (tip {existing[:12]}, expected "
                             f"{commit[:12]})", next_step=f"remove it with `git -C {repo} branch -D {branch}` "
                                                          "and run apply again")
        progress(f"apply: branch {branch} already holds this request ({commit[:12]}); not committing again")
        result.reused = True
    else:
        git.create_branch(branch, commit)
        created = True
        progress(f"apply: committed {commit[:12]} on {branch}")
    result.commit = commit
    return created


def _build_and_gate(options: ApplyOptions, repo: Path, build_a: Build, result: ApplyResult, manifest: dict,
                    changes: list[FileChange]) -> None:
    """Build the patched branch (B) with A's options and, unless --no-gate, prove B computes what A does;
    the evidence goes into `result` and `manifest`."""
    from amppatch.build import build

    branch = result.branch
    progress(f"apply: building the patched branch (B, {branch}) ...")
    try:
        build_b = build(_build_options(options, repo, str(branch), f"B ({branch})"))
    except BuildError as exc:
        raise BuildError(f"the patched branch does not compile: {exc.message}",
                         next_step="the patch was rejected and its branch removed; report the site",
                         returncode=exc.returncode, output_tail=exc.output_tail) from exc
    result.builds = {"a": str(build_a.dir), "b": str(build_b.dir)}
    manifest["builds"] = result.builds
    if options.gate:
        from amppatch.pages import ENTRY, verify_hugepages

        # a lever proves it ran like a site does: a breakpoint on its entry point in B
        also_ran = (ENTRY,) if result.levers else ()
        manifest["gate"] = result.gate = gate_sites(build_a, build_b, result.sites, model=options.gate_model,
                                                    extra_args=options.gate_args, default_type=options.gate_type,
                                                    locations=breakpoint_locations(result.sites, changes),
                                                    also_ran=also_ran)
        if result.levers:
            manifest["hugepages"] = verify_hugepages(build_a, build_b, Path(result.gate["model"]))


def _carry_over(manifest_path: Path, manifest: dict) -> None:
    """Evidence an earlier run of the same request gathered (builds, gate) stays when this run did not redo
    it (e.g. a later --no-build run of the same request)."""
    try:
        previous = json.loads(manifest_path.read_text())
    except (OSError, ValueError):  # unreadable or not UTF-8/JSON: nothing to carry over
        previous = {}
    if isinstance(previous, dict) and previous.get("commit") == manifest["commit"]:
        for key in ("builds", "gate", "hugepages"):
            if key not in manifest and key in previous:
                manifest[key] = previous[key]


def _options_json(options: ApplyOptions) -> dict:
    return json.loads(json.dumps(asdict(options), default=str))


def format_summary(result: ApplyResult) -> str:
    """Human summary for stderr."""
    lines = []
    for s in result.sites:
        if s.stream.tile_step is not None:
            copies = f", one per unrolled copy ({s.stream.unroll})" if s.stream.unroll else ""
            per_iter = f"tile bytes/iter computed in place -> every line of the tile{copies}"
        else:
            size = s.stream.bytes_per_iteration if s.stream.bytes_per_iteration is not None else "?"
            per_iter = f"{size} B/iter -> {s.lines} prefetch(es)/iter"
        lines.append(f"  site {s.key}: {s.file}:{s.loop.start_line} ({s.loop.guard or 'no #if'}), "
                     f"{s.stream.kind} stream {s.stream.expression}, {per_iter}, "
                     f"distance {s.request.distance_bytes} B, hint {s.request.hint}")
    lines += [f"  {lv.message_line().replace('Lever: ', 'lever ', 1)}" for lv in result.levers]
    return "\n".join(lines)

