"""amppatch apply: plan → render → edit → verify → commit/export → build A and B → correctness gate.

* **Sites** are keyed by function + loop (0-based ordinal in source order, or ``L<line>``) + stream (the
  address expression, e.g. ``x[ib]``, or its base pointer). ``--site FUNCTION[:LOOP[:STREAM]]`` defaults
  the loop to the function's first live outermost streaming loop and the stream to the one coming from the
  earliest pointer parameter (the weight row of a ggml vec_dot). ``--profile profile.json`` takes the
  profile's ``sites`` (``function``, ``loop``, ``stream``, ``distance_bytes``, ``hint``, ``inputs``).
* **Defaults** for manual sites: 2048 bytes ahead, locality 3 (``DEFAULT_DISTANCE``, ``DEFAULT_HINT``). The
  Q8_0 weight stream gains most from a prefetch several KiB ahead with locality 3 at 1 thread
  (docs/RESULTS.md, "tune"); 2 KiB is ~60 Q8_0 blocks, several memory latencies of consumption at
  one thread's streaming rate, and still well inside the L1/L2 reach of the hardware prefetchers' pages.
* **Rendering** uses the Jinja templates in ``amppatch/templates`` with StrictUndefined; each inserted line
  carries ``/* amppatch: <site key> ... */``. Edits are spliced in reverse byte order; the file is
  re-parsed and must not have more ERROR nodes than before. A loop that already carries this site's marker
  is left alone, so a second apply changes nothing.
* **Git**: a dirty tree is refused; the patch is committed on ``amppatch/<id>`` without touching the
  user's branch, index or working files (blobs, a temporary index and ``commit-tree``); ``<id>`` hashes the
  base commit, the resolved sites and parameters and the tool version, so the same request finds its
  branch. The commit is deterministic (fixed identity, the base's date), so a branch is reused only when
  its tip is the very commit the request makes; a reset, amended or extended branch is refused.
  ``<id>.patch`` (format-patch) and ``<id>.json`` (the manifest) go to the output directory, after
  ``check_export`` found them consistent (commit, base, files, added lines, each site's parameters).
* **Levers** (``--hugepages``): whole-program edits committed beside the sites, or alone. The huge-page
  lever (``amppatch.pages``) edits llama.cpp's weight mapping; the request id then also covers where it went
  and its own templates' digest, the commit message gets a ``Lever:`` line, the manifest lists ``levers``
  and pins the lever's added lines (``added_sha256`` of its file entry), and the gate proves the lever ran
  and records the share of the model file on huge pages in A and B (``hugepages``).

Modules, in the order apply uses them: ``plan`` (requests and planning), ``render`` (templates, edits,
file changes), ``levers`` (what id, message and export check know of a lever), ``gitrepo`` (request id,
commit, export check), ``stage`` (``apply`` itself); the gate's
helpers (which model runs a kernel, proof that it ran) are ``amppatch.gate_sites``. Every public name is
importable from ``amppatch.patch``; a test that monkeypatches a helper must patch the module that calls it
(``amppatch.patch.stage.check_export``, ``amppatch.patch.render.render_site``).
"""

from __future__ import annotations

# The gate helpers lived here before the gate got a module of its own; importers still find them here.
from amppatch.gate_sites import (
    breakpoint_locations,
    count_function_hits,
    gate_runtime_args,
    gate_sites,
    line_breakpoint_hits,
    model_type_for,
)
from amppatch.patch.gitrepo import (
    BRANCH_PREFIX,
    GitRepo,
    ParsedPatch,
    PatchFile,
    check_export,
    commit_message,
    parse_format_patch,
    request_id,
    templates_digest,
)
from amppatch.patch.levers import (
    HUGEPAGES,
    LEVERS,
    LeverEdit,
    check_levers,
    lever_marker,
    lever_of,
    lever_templates_digest,
)
from amppatch.patch.manifest import ApplyManifest
from amppatch.patch.plan import (
    DEFAULT_DISTANCE,
    DEFAULT_HINT,
    MAX_DISTANCE,
    Plan,
    PlannedSite,
    SiteRequest,
    Skipped,
    analyze_requests,
    cache_line_size,
    parse_loop_key,
    parse_site_spec,
    plan_sites,
    sites_from_learned,
    sites_from_profile,
)
from amppatch.patch.render import (
    TUNABLES_HEADER,
    Edit,
    FileChange,
    already_applied,
    build_changes,
    comment_safe,
    environment,
    include_edit,
    marker,
    new_marked_lines,
    render_site,
    render_tunables_header,
    site_edits,
    splice,
    unified_diff,
)
from amppatch.patch.stage import SCHEMA_VERSION, ApplyOptions, ApplyResult, apply, format_summary

__all__ = [
    "BRANCH_PREFIX", "DEFAULT_DISTANCE", "DEFAULT_HINT", "HUGEPAGES", "LEVERS", "MAX_DISTANCE", "SCHEMA_VERSION",
    "TUNABLES_HEADER", "ApplyManifest", "ApplyOptions", "ApplyResult", "Edit", "FileChange", "GitRepo", "LeverEdit",
    "ParsedPatch", "PatchFile", "Plan",
    "PlannedSite", "SiteRequest", "Skipped",
    "already_applied", "analyze_requests", "apply", "breakpoint_locations", "build_changes", "cache_line_size",
    "check_export", "check_levers", "comment_safe", "commit_message", "count_function_hits", "environment",
    "format_summary",
    "gate_runtime_args", "gate_sites", "include_edit", "lever_marker", "lever_of", "lever_templates_digest",
    "line_breakpoint_hits", "marker", "model_type_for",
    "new_marked_lines", "parse_format_patch", "parse_loop_key", "parse_site_spec", "plan_sites",
    "render_site", "render_tunables_header", "request_id", "site_edits", "sites_from_learned",
    "sites_from_profile", "splice", "templates_digest", "unified_diff",
]
