"""Which programs a llama.cpp tree builds and gates with, read from its CMakeLists; the flags its programs
take, read from their usage text; and the one error for a tree older than amppatch supports."""

from __future__ import annotations

from pathlib import Path

import pytest

from amppatch.build import Build
from amppatch.build.accepted import parse_help_flags, supported
from amppatch.build.programs import TreePrograms, choose_programs, declared_executables, require_programs
from amppatch.errors import UsageError
from amppatch.workspace import OLDEST_SUPPORTED_VERSION, check_llama_tree, describe_tree

# The shapes of the CMakeLists in the pinned tree (tools/ with an -impl library before each program, and a
# chat-only llama-cli next to llama-completion) and in llama-cpp-python 0.3.9's (tools/main is llama-cli).
PINNED = {
    "tools/completion/CMakeLists.txt": """
# llama-completion-impl: completion logic, reusable by app
set(TARGET llama-completion-impl)
add_library(${TARGET} completion.cpp)
set(TARGET llama-completion)
add_executable(${TARGET} main.cpp)
""",
    "tools/cli/CMakeLists.txt": "set(TARGET llama-cli-impl)\nadd_library(${TARGET} cli.cpp)\n"
                                "set(TARGET llama-cli)\nadd_executable(${TARGET} main.cpp)\n",
    "tools/llama-bench/CMakeLists.txt": "set(TARGET llama-bench)\nadd_executable(${TARGET} main.cpp)\n",
    "tools/perplexity/CMakeLists.txt": "set(TARGET llama-perplexity)\nadd_executable(${TARGET} main.cpp)\n",
    "tools/quantize/CMakeLists.txt": "set(TARGET llama-quantize)\nadd_executable(${TARGET} main.cpp)\n",
    "tools/mtmd/CMakeLists.txt": "    add_executable(llama-llava-cli    deprecation-warning.cpp)\n"
                                 "    set(TARGET llama-mtmd-cli)\n"
                                 "    add_executable         (${TARGET} mtmd-cli.cpp)\n",
    "tests/CMakeLists.txt": """
function(llama_build_and_test source)
    add_executable(${TEST_TARGET} ${source} get-model.cpp)
endfunction()
# llama_build_and_test(test-double-float.cpp) # SLOW
llama_build_and_test(test-json-schema-to-grammar.cpp   WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/..)
llama_build_and_test(test-tokenizer-0.cpp NAME test-tokenizer-0-llama-spm ARGS x.gguf)
if (NOT GGML_BACKEND_DL AND GGML_CPU)
    llama_build_and_test(test-quantize-fns.cpp)
endif()
""",
}
OLD = {
    "tools/main/CMakeLists.txt": "set(TARGET llama-cli)\nadd_executable(${TARGET} main.cpp)\n",
    "tools/llama-bench/CMakeLists.txt": "set(TARGET llama-bench)\nadd_executable(${TARGET} llama-bench.cpp)\n",
    "tools/perplexity/CMakeLists.txt": "set(TARGET llama-perplexity)\nadd_executable(${TARGET} perplexity.cpp)\n",
    "tools/quantize/CMakeLists.txt": "set(TARGET llama-quantize)\nadd_executable(${TARGET} quantize.cpp)\n",
    "tests/CMakeLists.txt": "llama_target_and_test(test-quantize-fns.cpp)\n",
}


def test_declarations_are_read_with_their_files_and_comments_and_helpers_skipped():
    declared = declared_executables(PINNED)
    assert declared["llama-completion"] == "tools/completion/CMakeLists.txt"
    assert declared["llama-mtmd-cli"] == declared["llama-llava-cli"] == "tools/mtmd/CMakeLists.txt"
    assert declared["test-quantize-fns"] == declared["test-json-schema-to-grammar"] == "tests/CMakeLists.txt"
    assert "test-tokenizer-0-llama-spm" in declared and "test-tokenizer-0" not in declared  # NAME wins
    # libraries, commented-out calls and the helper's own definition declare no program
    assert not {"llama-completion-impl", "test-double-float", "source", "${TEST_TARGET}"} & set(declared)


def test_the_pinned_tree_keeps_its_programs():
    programs = choose_programs(declared_executables(PINNED))
    assert programs.to_json() == {"bench": "llama-bench", "completion": "llama-completion",
                                  "quantize": "llama-quantize", "perplexity": "llama-perplexity",
                                  "kernel_test": "test-quantize-fns"}
    assert not programs.needs_examples() and programs.missing == []
    assert [programs.target_for(t) for t in ("llama-completion", "ggml-cpu")] == ["llama-completion", "ggml-cpu"]


def test_a_tree_before_llama_completion_completes_with_llama_cli():
    programs = choose_programs(declared_executables(OLD))
    assert programs.names["completion"] == "llama-cli"
    assert programs.declared_in["completion"] == "tools/main/CMakeLists.txt"
    assert programs.kernel_test == "test-quantize-fns"
    assert programs.target_for("llama-completion") == "llama-cli"
    assert programs.roles_of(("llama-bench", "llama-completion", "ggml-cpu")) == ["bench", "completion"]


def test_programs_under_examples_need_the_examples_built():
    moved = {path.replace("tools/", "examples/"): text for path, text in OLD.items()}
    programs = choose_programs(declared_executables(moved))
    assert programs.needs_examples() and programs.names["completion"] == "llama-cli"


def test_lines_of_a_grep_read_like_whole_files():
    """At a commit only the declaration lines are read (git grep): the same programs come out."""
    lines = {path: "\n".join(line for line in text.splitlines()
                             if any(w in line for w in ("set(TARGET", "add_executable", "llama_")))
             for path, text in PINNED.items()}
    assert choose_programs(declared_executables(lines)) == choose_programs(declared_executables(PINNED))


def test_a_tree_without_the_programs_is_too_old_by_name():
    programs = choose_programs(declared_executables({"tools/llama-bench/CMakeLists.txt": OLD[
        "tools/llama-bench/CMakeLists.txt"]}))
    assert programs.missing == ["completion", "quantize", "perplexity"] and programs.kernel_test is None
    require_programs(programs, ["bench"], "/src/llama.cpp")  # a build of what it has is fine
    with pytest.raises(UsageError) as info:
        require_programs(programs, programs.roles_of(("llama-bench", "llama-completion", "llama-perplexity")),
                         "/src/llama.cpp (commit 0123456789ab)")
    message = info.value.message
    assert message.startswith("/src/llama.cpp (commit 0123456789ab) is older than amppatch supports")
    assert "llama-completion or llama-cli, llama-perplexity" in message
    assert f"llama-cpp-python {OLDEST_SUPPORTED_VERSION}" in message
    assert f"--version {OLDEST_SUPPORTED_VERSION}" in info.value.next_step


def _llama_shaped(root: Path, *, cpu_dir: bool) -> Path:
    for d in ("include", "ggml/src/ggml-cpu" if cpu_dir else "ggml/src"):
        (root / d).mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("")
    (root / "include" / "llama.h").write_text("")
    return root


def test_a_tree_without_the_cpu_backend_directory_is_too_old(tmp_path: Path):
    repo = _llama_shaped(tmp_path / "llama.cpp", cpu_dir=False)
    with pytest.raises(UsageError) as info:
        check_llama_tree(repo)
    assert info.value.message.startswith(f"{repo} is older than amppatch supports")
    assert "no ggml/src/ggml-cpu directory" in info.value.message
    assert OLDEST_SUPPORTED_VERSION in info.value.message
    # a directory that is not llama.cpp at all is still told so
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match=r"not a llama\.cpp source tree \(missing CMakeLists.txt"):
        check_llama_tree(tmp_path / "other")


def test_the_tree_is_named_by_its_fetched_version_else_its_commit(tmp_path: Path):
    repo = _llama_shaped(tmp_path / "llama.cpp", cpu_dir=False)
    assert describe_tree(repo) == str(repo)  # no .git: its path alone
    git = repo / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/my-work\n")
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "ab" * 20 + " refs/heads/my-work\n")
    assert describe_tree(repo) == f"{repo} (commit {'ab' * 6})"
    (git / "refs" / "heads" / "my-work").write_text("cd" * 20 + "\n")  # a loose ref wins over the packed one
    assert describe_tree(repo) == f"{repo} (commit {'cd' * 6})"
    assert describe_tree(repo, "ef" * 20) == f"{repo} (commit {'ef' * 6})"
    (git / "amppatch-fetched").write_text("llama-cpp-python==0.2.90\n")
    with pytest.raises(UsageError, match=r"\(llama-cpp-python 0\.2\.90's llama\.cpp\) is older than amppatch"):
        check_llama_tree(repo)


def test_a_build_runs_the_programs_its_manifest_records(tmp_path: Path):
    old = Build(tmp_path, {"programs": TreePrograms({"completion": "llama-cli", "bench": "llama-bench"}).to_json()},
                tmp_path)
    assert old.program_name("completion") == "llama-cli" and old.program_name("bench") == "llama-bench"
    with pytest.raises(UsageError, match="declares no llama-completion or llama-cli program"):
        Build(tmp_path, {"programs": {"completion": None}}, tmp_path).program_name("completion")
    # a manifest from before programs were recorded: the current names
    assert Build(tmp_path, {}, tmp_path).program_name("completion") == "llama-completion"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-cli").write_text("")
    assert old.program("completion") == tmp_path / "bin" / "llama-cli"


USAGE = """----- common params -----

-h,    --help, --usage                  print usage and exit
-c,    --ctx-size N                     size of the prompt context (default: 4096, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
--no-warmup                             skip warming up the model with an empty run

----- example-specific params -----

-no-cnv, --no-conversation              force disable conversation mode (default: false)
--simple-io                             use basic IO for better compatibility in subprocesses and limited
                                        consoles; see --no-display-prompt
"""


def test_usage_text_lists_every_flag_spelling_and_only_those():
    flags = parse_help_flags(USAGE)
    assert flags == {"-h", "--help", "--usage", "-c", "--ctx-size", "--no-warmup", "-no-cnv", "--no-conversation",
                     "--simple-io"}
    # a flag goes only where every program takes it; an unknown set holds nothing back
    perplexity = frozenset({"-c", "--chunks"})
    assert supported(("-no-cnv", "--no-warmup", "-nr"), flags) == ("-no-cnv", "--no-warmup")
    assert supported(("--no-warmup", "-c"), flags, perplexity) == ("-c",)
    assert supported(("-nr",), None) == ("-nr",)


def test_kernel_test_is_not_available_where_the_tree_declares_none(monkeypatch: pytest.MonkeyPatch, tmp_path):
    import amppatch.build as build_mod
    from amppatch.gate import kernel_test

    monkeypatch.setattr(build_mod, "source_text", lambda _b, _rel: "int main() {}")
    b = Build(tmp_path, {"programs": {"completion": "llama-cli", "kernel_test": None}}, tmp_path)
    record = kernel_test(b, b, ["ggml_vec_dot_q8_0_q8_0"])
    assert record["status"] == "not available" and "declares no test-quantize-fns target" in record["reason"]


def test_a_commits_declarations_come_from_one_grep(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`git grep` at a commit prints COMMIT:PATH:LINE:TEXT; the programs come from those lines alone."""
    import amppatch.build.resolution as resolution

    commit = "f7c93228e7b68b7c1361d8214004198046f8f041"
    output = "".join(f"{commit}:{path}:{n}:{line}\n" for path, text in OLD.items()
                     for n, line in enumerate(text.splitlines(), 1))
    calls: list[tuple[str, ...]] = []

    def fake_git(_repo: Path, *args: str, check: bool = True) -> str:
        calls.append(args)
        return output

    monkeypatch.setattr(resolution, "_git", fake_git)
    programs = resolution.tree_programs(tmp_path, commit, in_place=False)
    assert programs.names["completion"] == "llama-cli" and programs.kernel_test == "test-quantize-fns"
    assert len(calls) == 1 and calls[0][0] == "grep" and commit in calls[0]
