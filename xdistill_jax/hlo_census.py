"""The kernels of a compiled program and the bytes they move, read from XLA's optimised HLO.

    compiled = jax.jit(step).lower(*args).compile()
    kernels = hlo_census.kernels(compiled.as_text())
    print(hlo_census.markdown(hlo_census.summarize(kernels, bandwidth=3.35e12)))

A **kernel** is an instruction of the entry computation that does device work: everything but
`parameter`, `constant`, `tuple`, `get-tuple-element` and `bitcast`. On a GPU each is (at
least) one launch: a fusion, a library call (cuDNN convolution, cuBLAS gemm), a copy.

Its **bytes** are those of its result plus those of each distinct operand: what it moves to and
from device memory if it reads every operand element once and keeps nothing between kernels
(`u8` scratch of library calls is not counted). That is an estimate, not XLA's cost model: a
kernel that reads a slice of an operand is charged the whole operand, one that reads an element
twice is charged once. Except a kernel that is nothing but a slice (a `slice`, or a fusion of
one, like the `wrapped_slice` fusions XLA cuts a combined all-reduce's result into): it reads
what it writes, so it is charged its result twice. (Charging those the whole buffer counted
2.0 GB of a 4 x H200 train step's 19.4 GB that no kernel moves: 331 slices of all-reduces up
to 60 MB; benchmarks/RESULTS.md, 2026-12-05.) Summed over the step it is the traffic of the memory roofline: a
memory-bound step cannot run faster than bytes / bandwidth. The benchmarks use it to compare
two versions of a program compiled for the same target, and to read a GPU program compiled
without a GPU (`benchmarks/gpu_aot.py`); only a run on the device measures time.

Each kernel is attributed to a scope and pass (`profile_summary.scope_of`, the train step's
`jax.named_scope`s) and a kind of work (`profile_summary.kind_of`).

A **library call** is a cuDNN convolution or cuBLAS gemm (`custom-call` to `__cudnn$...` or
`__cublas$...`). On a GPU, XLA autotunes each distinct configuration once per compile (with an
empty cache: times each candidate algorithm on the device), so the number of distinct
configurations is what a cold start's autotuning grows with (about 0.5 s each on an H200,
benchmarks/RESULTS.md). Two calls share a configuration when their target, operand and result
shapes and layouts, window, dimension labels and backend config agree (`config_key`, which
leaves out names, metadata and the scheduling queue).

A **wide convolution** is a library convolution whose window is wider than `MAX_WINDOW` (7, the
widest kernel of the networks here: the ResNet stem's): a weight gradient that XLA did not map to
cuDNN's backward-filter kernel and runs as a forward convolution over the whole feature map. Its
bytes look harmless, its time does not: the translator's two dilated 3x3 convolutions had such
weight gradients, 1.5 ms each of a 23 ms step on an H200 (benchmarks/RESULTS.md, 2026-12-04).
`summarize` lists them.

An **unaligned convolution** is a 16-bit (bf16, f16) library convolution whose input or output
channel count is not a multiple of 8 (4 input channels allowed: an image's 3, padded; NVIDIA's
case for a first layer): cuDNN's tensor-core kernels want multiples of 8, and XLA pads only f16
convolutions so (`models.conv.tensor_core_channels` pads the networks' bf16 ones on a GPU, where
no operand grows past 1.35x). `summarize` lists them with their channels.

Straight-line programs only: an entry computation with a `while`, `conditional` or `call`
raises (the kernels of their bodies would run an unknown number of times).

**Collectives** (`collectives`): the cross-device communication of a program compiled for a
mesh of several devices (all-reduce, all-gather, ...), anywhere in the module, with the
operation each came from. A data-parallel step with replicated parameters needs only
all-reduces (gradients, BatchNorm statistics, loss means); an all-gather there means some part
of the step ran on the whole batch on every device (tests/test_train_step.py).
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any, Iterable

from xdistill_jax import profile_summary

BYTES_PER_ELEMENT = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                     "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                     "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
NO_WORK = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
NOT_STRAIGHT = ("while", "conditional", "call")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
MAX_WINDOW = 7
# A kernel moving fewer bytes than this (0.06 us at an H100's 3.35 TB/s) takes its launch and
# latency, a few microseconds on a GPU, whatever its bytes: the memory roofline does not see it.
SMALL_KERNEL_BYTES = 200_000

_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_DEF_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_WINDOW_RE = re.compile(r"window=\{size=([0-9x]+)")
_LIBRARY_RE = re.compile(r'custom_call_target="(__cudnn\$[^"]*|__cublas\$[^"]*)"')
_DIM_LABELS_RE = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
ALIGNMENT = 8  # channels of a 16-bit convolution on tensor cores
SIXTEEN_BIT = ("bf16", "f16")


def conv_channels(rhs: str, shapes: dict[str, str]) -> tuple[str, int, int] | None:
    """(element type, input channels, output channels) of a cuDNN convolution's definition
    (`rhs`, after "name = "), read from its filter: operand 1 of a forward or backward-input
    convolution, the result of a backward-filter one, labelled by dim_labels' kernel part
    ("o01i": o output, i input channels). None for anything else."""
    target = _LIBRARY_RE.search(rhs)
    labels = _DIM_LABELS_RE.search(rhs)
    if target is None or labels is None or "conv" not in target.group(1):
        return None
    shape, _, operand_text = split_definition(rhs)
    if "BackwardFilter" in target.group(1):
        filter_shape = shape
    else:
        operands = re.findall(r"%([\w.\-]+)", operand_text)
        if len(operands) < 2 or operands[1] not in shapes:
            return None
        filter_shape = shapes[operands[1]]
    arrays = _arrays_with_dims(filter_shape)
    kernel = labels.group(2)
    if not arrays or len(arrays[0][1]) != len(kernel):
        return None
    dtype, dims = arrays[0]
    return dtype, dims[kernel.index("i")], dims[kernel.index("o")]


def _arrays_with_dims(shape: str) -> list[tuple[str, list[int]]]:
    """(element type, dimensions) of each array of an HLO shape (a tuple's arrays in order)."""
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY_RE.findall(shape)]


def unaligned(channels: tuple[str, int, int] | None) -> bool:
    """A 16-bit convolution whose channels cuDNN's tensor-core kernels do not take (see the
    module docstring); False for other types and non-convolutions."""
    if channels is None or channels[0] not in SIXTEEN_BIT:
        return False
    _, cin, cout = channels
    return bool((cin % ALIGNMENT and cin != 4) or cout % ALIGNMENT)


def config_key(rhs: str, shapes: dict[str, str]) -> str:
    """A library call's configuration: its definition (right-hand side) with each operand name
    replaced by that operand's shape, and without metadata and the scheduling queue."""
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", rhs)
    text = re.sub(r'"operation_queue_id":"[^"]*",?', "", text)
    return re.sub(r"%([\w.\-]+)", lambda m: shapes.get(m.group(1), m.group(0)), text)


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(element type, element count) of each array of an HLO shape (a tuple's arrays in order)."""
    return [(dtype, math.prod(dims)) for dtype, dims in _arrays_with_dims(shape)]


def shape_bytes(shape: str, *, scratch: bool = False) -> int:
    """Bytes of an HLO shape (`f32[12,192,640]{2,1,0}` or a tuple of them); `u8` arrays (library
    scratch) count only with scratch=True. Token and opaque types count 0."""
    total = 0
    for dtype, n in _arrays(shape):
        if dtype not in BYTES_PER_ELEMENT:
            raise ValueError(f"unknown HLO element type {dtype!r} in shape {shape!r}")
        if dtype != "u8" or scratch:
            total += n * BYTES_PER_ELEMENT[dtype]
    return total


def split_definition(rhs: str) -> tuple[str, str, str]:
    """`SHAPE opcode(operands), attrs` -> (shape, opcode, operand text)."""
    if rhs.startswith("("):  # tuple shape: up to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rhs[:i + 1], rhs[i + 1:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    match = re.match(r"([a-z][\w\-]*)\(", rest)
    if match is None:
        raise ValueError(f"not an HLO instruction: {rhs[:120]!r}")
    depth, start = 0, match.end() - 1
    for i in range(start, len(rest)):
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        if depth == 0:
            break
    return shape, match.group(1), rest[start + 1:i]


def collectives(hlo_text: str) -> list[dict[str, str]]:
    """The collectives of a compiled program, anywhere in the module, in text order: {"opcode"
    (without an async "-start"), "shape" (the instruction's: an async start's holds its operands
    too), "result" (the shape of what it returns: an async collective's "-done"), "op_name" (the
    operation of the jaxpr it came from, "" if none)}. An async collective counts once (its
    "-start"; "-done" is skipped)."""
    out, starts = [], {}
    for line in hlo_text.splitlines():
        match = _DEF_RE.match(line)
        if match is None or not any(c in line for c in COLLECTIVES):
            continue
        try:
            shape, opcode, operands = split_definition(match.group(2))
        except ValueError:
            continue
        if opcode.endswith("-done"):
            start = starts.get(operands.strip().lstrip("%"))
            if start is not None:
                start["result"] = shape
            continue
        base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if base in COLLECTIVES:
            op_name = re.search(r'op_name="([^"]*)"', line)
            out.append({"opcode": base, "shape": shape, "result": shape,
                        "op_name": op_name.group(1) if op_name else ""})
            if opcode.endswith("-start"):
                starts[match.group(1)] = out[-1]
    return out


def collective_totals(found: Iterable[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """`collectives`' list by opcode: {opcode: {"count", "elements": {dtype: elements}}}, the
    elements of each collective's result (all of a tuple's arrays) by element type: a
    data-parallel step's all-reduces carry its gradients and statistics in these types."""
    out: dict[str, dict[str, Any]] = {}
    for c in found:
        entry = out.setdefault(c["opcode"], {"count": 0, "elements": {}})
        entry["count"] += 1
        for dtype, n in _arrays(c["result"]):
            entry["elements"][dtype] = entry["elements"].get(dtype, 0) + n
    return out


def describe_collectives(totals: dict[str, dict[str, Any]]) -> str:
    """`collective_totals` in words, e.g. "35 all-reduce (26.98 M f32, 0.01 M bf16)"; "none"."""
    parts = []
    for op, entry in sorted(totals.items()):
        sizes = ", ".join(f"{n / 1e6:.2f} M {dtype}" for dtype, n in
                          sorted(entry["elements"].items(), key=lambda kv: -kv[1]))
        parts.append(f"{entry['count']} {op}" + (f" ({sizes})" if sizes else ""))
    return ", ".join(parts) or "none"


def entry_lines(hlo_text: str) -> list[str]:
    """The instruction lines of the ENTRY computation."""
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in the HLO text")
    body = hlo_text[start + 1:]
    end = body.find("\n}")
    return [line for line in body[:end].splitlines()[1:] if " = " in line]


def slice_computations(hlo_text: str) -> set[str]:
    """The names of the computations whose only work is one `slice` of a parameter (what a
    fusion of a lone slice calls)."""
    ops: dict[str, list[str]] = collections.defaultdict(list)
    for computation, line in profile_summary.computation_lines(hlo_text):
        match = _DEF_RE.match(line)
        if match:
            try:
                ops[computation].append(split_definition(match.group(2))[1])
            except ValueError:
                ops[computation].append("?")
    return {c for c, found in ops.items() if [op for op in found if op != "parameter"] == ["slice"]}


def _straight_entry(hlo_text: str):
    """(line, name, right-hand side, split_definition of it) per instruction of the ENTRY
    computation, in program order; ValueError at a `while`, `conditional` or `call` (the work of
    their bodies would count an unknown number of times)."""
    for line in entry_lines(hlo_text):
        match = _DEF_RE.match(line)
        if match is None:
            continue
        name, rhs = match.groups()
        parts = split_definition(rhs)
        if parts[1] in NOT_STRAIGHT:
            raise ValueError(f"instruction {name} is a {parts[1]}: only straight-line entry computations "
                             "are read")
        yield line, name, rhs, parts


def kernels(hlo_text: str) -> list[dict[str, Any]]:
    """The kernels of the entry computation, in program order: {"name", "opcode", "kind",
    "scope", "pass", "bytes", "out_bytes", "window", "config"} (see the module docstring;
    "window" is a convolution's window size, e.g. (3, 3), else None; "config" a library call's
    `config_key`, else None)."""
    info = profile_summary.hlo_instructions(hlo_text)
    slices = slice_computations(hlo_text)
    shapes: dict[str, str] = {}
    out = []
    for line, name, rhs, (shape, opcode, operand_text) in _straight_entry(hlo_text):
        shapes[name] = shape
        if opcode in NO_WORK or opcode.endswith("-done"):  # an async op's "-done" waits for its "-start"
            continue
        operands = dict.fromkeys(re.findall(r"%([\w.\-]+)", operand_text))
        unknown = [o for o in operands if o not in shapes]
        if unknown:
            raise ValueError(f"instruction {name}: operand {unknown[0]} is not defined before it")
        out_bytes = shape_bytes(shape)
        only_a_slice = opcode == "slice" or (opcode == "fusion" and info.get(name, {}).get("calls") in slices)
        scope, direction = profile_summary.scope_of(info[name]["op_name"] if name in info else "")
        kind = profile_summary.kind_of(info.get(name))
        window = _WINDOW_RE.search(line) if kind == "convolution/matmul" else None
        library = _LIBRARY_RE.search(line) if opcode == "custom-call" else None
        out.append({"name": name, "opcode": opcode, "kind": kind,
                    "scope": scope, "pass": direction, "out_bytes": out_bytes,
                    "bytes": 2 * out_bytes if only_a_slice else
                    out_bytes + sum(shape_bytes(shapes[o]) for o in operands),
                    "window": tuple(int(v) for v in window.group(1).split("x")) if window else None,
                    "config": config_key(rhs, shapes) if library else None,
                    "channels": conv_channels(rhs, shapes) if library else None})
    return out


def summarize(kernel_list: Iterable[dict[str, Any]], *, bandwidth: float | None = None,
              top: int = 10, small_bytes: int = SMALL_KERNEL_BYTES) -> dict[str, Any]:
    """Totals by scope (with pass) and by kind, the `top` kernels by bytes, the kernels moving
    fewer than `small_bytes` by scope ("small_kernels"), and with `bandwidth` (bytes/s) the
    memory-roofline time bytes / bandwidth in ms."""
    kernel_list = list(kernel_list)
    small = collections.Counter(k["scope"] for k in kernel_list if k["bytes"] < small_bytes)
    scopes = collections.defaultdict(lambda: {"kernels": 0, "fwd_bytes": 0, "bwd_bytes": 0})
    kinds = collections.defaultdict(lambda: {"kernels": 0, "bytes": 0})
    for k in kernel_list:
        scopes[k["scope"]]["kernels"] += 1
        scopes[k["scope"]][f"{k['pass']}_bytes"] += k["bytes"]
        kinds[k["kind"]]["kernels"] += 1
        kinds[k["kind"]]["bytes"] += k["bytes"]
    order = {s: i for i, s in enumerate(profile_summary.SCOPES + ("other",))}
    total = sum(k["bytes"] for k in kernel_list)
    return {
        "kernels": len(kernel_list),
        "bytes": total,
        "roofline_ms": total / bandwidth * 1e3 if bandwidth else None,
        "scopes": [{"scope": s, **v, "bytes": v["fwd_bytes"] + v["bwd_bytes"]}
                   for s, v in sorted(scopes.items(), key=lambda kv: order.get(kv[0], len(order)))],
        "kinds": [{"kind": k, **v} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])],
        "top": sorted(kernel_list, key=lambda k: -k["bytes"])[:top],
        "small_bytes": small_bytes,
        "small_kernels": dict(sorted(small.items(), key=lambda kv: (-kv[1], kv[0]))),
        "wide_convolutions": [k for k in kernel_list
                              if k.get("window") and max(k["window"]) > MAX_WINDOW],
        "unaligned_convolutions": [k for k in kernel_list if unaligned(k.get("channels"))],
        "library_calls": sum(1 for k in kernel_list if k.get("config")),
        "library_configs": len({k["config"] for k in kernel_list if k.get("config")}),
    }


def markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: a totals line, then tables by scope, by kind and the top kernels."""
    total = summary["bytes"]
    head = f"{summary['kernels']} kernels, {total / 1e9:.2f} GB moved per step (estimate)"
    if summary.get("roofline_ms") is not None:
        head += f", memory roofline {summary['roofline_ms']:.2f} ms"
    head += (f"; {summary['library_calls']} cuDNN/cuBLAS calls in {summary['library_configs']} "
             "distinct configurations (each autotuned once on a GPU)")
    lines = [head, "", "| scope | kernels | fwd GB | bwd GB | GB (%) |", "|---|---|---|---|---|"]
    for s in summary["scopes"]:
        lines.append(f"| {s['scope']} | {s['kernels']} | {s['fwd_bytes'] / 1e9:.3f} | "
                     f"{s['bwd_bytes'] / 1e9:.3f} | {s['bytes'] / 1e9:.3f} ({profile_summary._pct(s['bytes'], total)}) |")
    lines += ["", "| kind | kernels | GB (%) |", "|---|---|---|"]
    for k in summary["kinds"]:
        lines.append(f"| {k['kind']} | {k['kernels']} | {k['bytes'] / 1e9:.3f} ({profile_summary._pct(k['bytes'], total)}) |")
    lines += ["", "| kernel | scope (pass) | kind | MB |", "|---|---|---|---|"]
    for k in summary["top"]:
        lines.append(f"| {k['name']} | {k['scope']} ({k['pass']}) | {k['kind']} | {k['bytes'] / 1e6:.1f} |")
    small = summary.get("small_kernels", {})
    lines += ["", f"Small kernels (each moving < {summary.get('small_bytes', SMALL_KERNEL_BYTES) / 1e6:g} MB: "
                  f"launch- and latency-bound on a GPU, unseen by the roofline): {sum(small.values()) or 'none'}"
                  + (" (" + ", ".join(f"{scope} {n}" for scope, n in small.items()) + ")" if small else "")]
    wide = summary["wide_convolutions"]
    lines += ["", f"Wide convolutions (window over {MAX_WINDOW}x{MAX_WINDOW}: a gradient run as a "
                  f"forward convolution over the feature map): {len(wide) or 'none'}"]
    lines += [f"- {k['name']} {k['scope']} ({k['pass']}), window {'x'.join(map(str, k['window']))}"
              for k in wide]
    off = summary.get("unaligned_convolutions", [])
    lines += ["", f"Unaligned 16-bit convolutions (channels in or out not a multiple of {ALIGNMENT}, "
                  f"4 inputs allowed: off cuDNN's tensor-core kernels): {len(off) or 'none'}"]
    lines += [f"- {k['name']} {k['scope']} ({k['pass']}), {k['channels'][0]} {k['channels'][1]} -> "
              f"{k['channels'][2]} channels" for k in off]
    return "\n".join(lines)


_CYCLES_RE = re.compile(r'"estimated_cycles":"(\d+)"')


def estimated_cycles(hlo_text: str) -> dict[str, Any]:
    """libtpu's own estimate of a TPU program's time: the `estimated_cycles` its compiler writes
    into the backend config of the entry computation's instructions, summed by scope and pass
    (`profile_summary.scope_of`; "scopes": {scope: {"fwd": cycles, "bwd": cycles}}) and by opcode. A cost model's figure, not a measurement, and not
    every instruction carries one: "unestimated" counts by opcode those that do work and carry
    none (on a v5e train step: all-reduces, reduce-windows, some pads), and the async copies
    (`copy-start`/`-done`, overlapped with other work) are left out. For comparing two versions
    of a program compiled for the same TPU."""
    info = profile_summary.hlo_instructions(hlo_text)
    scopes: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"fwd": 0, "bwd": 0})
    opcodes: dict[str, int] = collections.Counter()
    unestimated: dict[str, int] = collections.Counter()
    top = []
    for line, name, _, (shape, opcode, _) in _straight_entry(hlo_text):
        found = _CYCLES_RE.search(line)
        if found is None:
            if (opcode not in NO_WORK and not opcode.startswith(("copy-", "slice-"))
                    and shape_bytes(shape) > SMALL_KERNEL_BYTES):
                unestimated[opcode] += 1
            continue
        cycles = int(found.group(1))
        scope, direction = profile_summary.scope_of(info[name]["op_name"] if name in info else "")
        scopes[scope][direction] += cycles
        opcodes[opcode] += cycles
        top.append((cycles, name))
    order = profile_summary.SCOPES + ("other",)
    return {"cycles": sum(opcodes.values()), "scopes": dict(sorted(scopes.items(), key=lambda kv: order.index(kv[0]))),
            "opcodes": dict(opcodes), "unestimated": dict(unestimated),
            "top": [name for _, name in sorted(top, reverse=True)[:10]]}


def cycles_markdown(estimate: dict[str, Any], clock_hz: float) -> str:
    """`estimated_cycles`'s result as markdown: the total, then a table by scope (ms at `clock_hz`)."""
    total = estimate["cycles"]
    lines = [f"{total / 1e6:.1f} M cycles estimated by libtpu, {total / clock_hz * 1e3:.2f} ms at "
             f"{clock_hz / 1e9:g} GHz" + (" (not estimated: " + ", ".join(
                 f"{n} {op}" for op, n in sorted(estimate["unestimated"].items())) + ")"
                 if estimate["unestimated"] else ""), "",
             "| scope | fwd ms | bwd ms | ms (%) |", "|---|---|---|---|"]
    for scope, passes in estimate["scopes"].items():
        fwd, bwd = passes["fwd"], passes["bwd"]
        lines.append(f"| {scope} | {fwd / clock_hz * 1e3:.2f} | {bwd / clock_hz * 1e3:.2f} | "
                     f"{(fwd + bwd) / clock_hz * 1e3:.2f} ({profile_summary._pct(fwd + bwd, total)}) |")
    return "\n".join(lines)
