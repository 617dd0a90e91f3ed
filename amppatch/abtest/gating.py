"""ab-test's correctness-gate planning: which llama-completion/llama-perplexity flags stand for an arm's
llama-bench flags, which arms must produce identical output, and the gate run for every pair."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from amppatch.abtest.options import AbTestOptions, ArmSpec, _Arm
from amppatch.errors import CorrectnessError
from amppatch.proc import progress

# llama-bench flag → (llama-completion/llama-perplexity flags) for the gate; None: scheduling only, the
# computation is the same, nothing to pass.
_SCHEDULING_FLAGS = {"-C", "--cpu-mask", "--cpu-strict", "--prio", "--delay", "--no-warmup", "--progress",
                     "-v", "--verbose", "--numa"}
_SAME_NAME_FLAGS = {"-b", "--batch-size", "-ub", "--ubatch-size", "-ctk", "--cache-type-k", "-ctv",
                    "--cache-type-v", "-t", "--threads", "--poll", "-fa", "--flash-attn"}
# Flags whose value changes which kernels run (so the gate compares perplexity within a tolerance).
_KERNEL_FLAGS = {"--repack", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-fa", "--flash-attn",
                 "-t", "--threads", "-b", "--batch-size", "-ub", "--ubatch-size"}



def _flag_values(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """Split a llama-bench argv into (flag, value) pairs ('--repack 0', '--repack=0', '-t 2')."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            flag, value = arg.split("=", 1)
            out.append((flag, value))
            i += 1
        elif (i + 1 < len(args) and not args[i + 1].startswith("-")) or (
            i + 1 < len(args) and re.fullmatch(r"-?\d+", args[i + 1])
        ):
            out.append((arg, args[i + 1]))
            i += 2
        else:
            out.append((arg, None))
            i += 1
    return out


def gate_args_for(bench_args: Sequence[str]) -> tuple[list[str], str | None]:
    """The llama-completion/llama-perplexity flags equivalent to an arm's llama-bench flags, or the flag
    that has no equivalent (then the gate cannot check this arm as it is timed)."""
    out: list[str] = []
    for flag, value in _flag_values(bench_args):
        if flag in _SCHEDULING_FLAGS:
            continue
        if flag == "--repack":
            if value is None or "," in value:
                return [], f"{flag} {value or ''}".strip()
            out.append("--repack" if value.strip() in ("1", "on", "true") else "-nr")
        elif flag in _SAME_NAME_FLAGS and value is not None and "," not in value:
            if flag in ("-fa", "--flash-attn") and value in ("0", "1"):
                value = "on" if value == "1" else "off"
            out.extend([flag, value])
        else:
            return [], f"{flag} {value or ''}".strip()
    return out, None


def kernel_signature(spec: ArmSpec, manifest: dict[str, Any]) -> tuple[Any, ...]:
    """What decides which kernels run (not how fast they are): CMake options, disabled ISA features and
    the kernel-relevant llama-bench flags. Equal signatures → the gate demands identical output."""
    kernel_flags = tuple(sorted((f, v) for f, v in _flag_values(spec.bench_args) if f in _KERNEL_FLAGS))
    cmake = manifest.get("cmake_options") or {}
    return (
        tuple(sorted((k, str(v)) for k, v in cmake.items() if not k.startswith("CMAKE_C_COMPILER_LAUNCHER"))),
        tuple(manifest.get("isa_disabled") or ()),
        kernel_flags,
    )



def _gate_pairs(arms: list[_Arm], options: AbTestOptions) -> list[dict[str, Any]]:
    """Run the correctness gate for every arm against the first; returns one record per pair."""
    from amppatch.gate import GateOptions, run_gate

    records: list[dict[str, Any]] = []
    base = arms[0]
    if options.skip_correctness:
        return [{"arm": a.spec.name, "baseline": base.spec.name, "mode": None, "passed": None,
                 "detail": "not checked (--skip-correctness)", "commands": []} for a in arms[1:]]
    gate_model = Path(options.gate_model or options.model)
    base_args, base_untranslatable = gate_args_for(base.spec.bench_args)
    for arm in arms[1:]:
        record: dict[str, Any] = {"arm": arm.spec.name, "baseline": base.spec.name}
        args, untranslatable = gate_args_for(arm.spec.bench_args)
        bad = base_untranslatable or untranslatable
        if bad:
            record.update(mode=None, passed=None, commands=[],
                          detail=f"not checked: llama-bench flag `{bad}` has no llama-completion equivalent")
            records.append(record)
            continue
        if options.gate_mode == "auto":
            same = kernel_signature(base.spec, base.build.manifest) == kernel_signature(arm.spec, arm.build.manifest)
            mode = "identical" if same else "tolerance"
        else:
            mode = options.gate_mode
        gopts = GateOptions(model=gate_model, mode=mode, ppl_rel_tolerance=options.ppl_tolerance,
                            extra_args=tuple(options.gate_args))
        progress(f"ab-test: correctness gate {arm.spec.name} vs {base.spec.name} ({mode}) ...")
        try:
            result = run_gate(base.build, arm.build, gopts, args_a=base_args, args_b=args,
                              env_a=dict(base.spec.env), env_b=dict(arm.spec.env))
        except CorrectnessError as exc:
            raise CorrectnessError(
                f"{arm.spec.name} vs {base.spec.name}: {exc.message}",
                next_step=(exc.next_step or "") + "; ab-test does not time arms that compute differently "
                "(--gate tolerance for different kernels by design, or --skip-correctness)",
            ) from exc
        record.update(result.to_json())
        record["gate_model"] = str(gate_model)
        records.append(record)
    return records


