"""Where a compiled step's device time goes: a text summary of a `jax.profiler` trace.

    with jax.profiler.trace(trace_dir):
        for _ in range(n): state, m = compiled(state, batch, rng)
    summary = summarize_trace(trace_dir, compiled.as_text(), steps=n)
    print(markdown(summary))

Reads the newest `*.xplane.pb` under the trace directory with `jax.profiler.ProfileData` (no
TensorBoard needed), keeps the events that carry an `hlo_op` stat for the step's HLO module (GPU
kernels, XLA:CPU thunks), and attributes each to

  * a **scope**: the innermost of `SCOPES` (the `jax.named_scope`s the train step opens, e.g.
    `depth_net`, `warp`, `reprojection`, `optimizer`) found in the op's `op_name` metadata in
    the optimised HLO, and the pass (`bwd` when the path is under `transpose(...)`, the
    autodiff backward pass; else `fwd`);
  * a **kind**: convolution / matmul (incl. cuDNN and cuBLAS custom calls), fusion by fusion
    kind, gather, reduce-window, copy / transpose, other.

A fusion is attributed by the metadata XLA keeps on the fusion instruction (its root op's), so
an op fused across two scopes counts for one of them. On GPU the events are the kernels (a
fusion that launches several kernels sums them); on CPU they are XLA:CPU thunks summed over the
threads that ran them, so the busy time may exceed the wall time.

Imports only jax and the standard library (runs where the train step runs).
"""

from __future__ import annotations

import collections
import pathlib
import re
from typing import Any

# The named scopes of the train step (objective.py, losses.py, train.py), innermost wins.
SCOPES = ("depth_net", "pose_net", "upsample", "warp", "reprojection", "select", "smoothness",
          "photometric", "translator", "distill", "optimizer")

_SCOPE_RE = re.compile(r"(?<![\w.])(" + "|".join(SCOPES) + r")(?![\w.])")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE_RE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")


def newest_xplane(trace_dir: str | pathlib.Path) -> pathlib.Path:
    """The most recently written `*.xplane.pb` under `trace_dir` (jax.profiler.trace's layout)."""
    found = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir} (was it written by jax.profiler.trace?)")
    return found[-1]


def hlo_module_name(hlo_text: str) -> str | None:
    m = re.search(r"^HloModule\s+([\w.\-]+)", hlo_text, re.M)
    return m.group(1) if m else None


def computation_lines(hlo_text: str):
    """(computation name, stripped line) for each line of optimised HLO text after a
    computation's header (`%name (...) -> ... {` or `ENTRY %name ... {`), up to the next one."""
    current = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and " = " not in stripped and not stripped.startswith("HloModule"):
            current = stripped.split()[1 if stripped.startswith("ENTRY") else 0].lstrip("%")
        elif current is not None:
            yield current, stripped


def hlo_instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """{instruction name: {"opcode", "calls", "kind", "backend", "calls_dot", "op_name"}} from optimised
    HLO text (`compiled.as_text()`).

    kind: the fusion kind (kLoop, kInput, kOutput, kCustom) or the custom-call target, else "";
    backend: a custom fusion's kind (e.g. "__triton_gemm", "__cudnn$fusion"); calls: the name of
    the computation the instruction calls (a fusion's), else ""; calls_dot: "1" when that
    computation holds a convolution or dot.
    """
    out = {}
    # op_name of each computation's ROOT (else its first op with one): a fusion instruction often
    # carries no metadata itself, the instructions of the computation it calls do.
    comp_op_name: dict[str, str] = {}
    comp_has_dot: set[str] = set()  # computations holding a convolution or dot
    for current, stripped in computation_lines(hlo_text):
        if re.search(r"\s(convolution|dot)\(", stripped):
            comp_has_dot.add(current)
        op_name = re.search(r'op_name="([^"]*)"', stripped)
        if op_name and stripped.startswith("ROOT"):
            comp_op_name[current] = op_name.group(1)
        elif op_name:
            comp_op_name.setdefault(current, op_name.group(1))
    for line in hlo_text.splitlines():
        m = _INSTR_RE.match(line)
        if not m or line.lstrip().startswith(("HloModule", "ENTRY", "}")):
            continue
        name, rest = m.group(1), m.group(2)
        op = _OPCODE_RE.search(" " + rest)
        if not op:
            continue
        kind = re.search(r"\bkind=(k\w+)", rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        backend = re.search(r'"kind":"(__[\w$]+)"', rest)  # e.g. a kCustom fusion's __triton_gemm
        found = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"\bcalls=%?([\w.\-]+)", rest)
        op_name = found.group(1) if found else comp_op_name.get(calls.group(1), "") if calls else ""
        out[name] = {
            "opcode": op.group(1),
            "calls": calls.group(1) if calls else "",
            "kind": kind.group(1) if kind else (target.group(1) if target else ""),
            "backend": backend.group(1) if backend else "",
            "calls_dot": "1" if calls and calls.group(1) in comp_has_dot else "",
            "op_name": op_name.split(";")[0],
        }
    return out


def scope_of(op_name: str) -> tuple[str, str]:
    """(innermost known scope or "other", "fwd" | "bwd") of an op_name metadata path."""
    found = list(_SCOPE_RE.finditer(op_name))
    scope = found[-1].group(1) if found else "other"
    return scope, ("bwd" if "transpose(" in op_name else "fwd")


def kind_of(info: dict[str, str] | None) -> str:
    """A coarse kind for an instruction: where the time of a step goes, by type of work."""
    if info is None:
        return "unknown"
    opcode, kind = info["opcode"], info["kind"].lower()
    special = f"{kind} {info['backend']}".lower() if opcode in ("custom-call", "fusion") else ""
    if (opcode in ("convolution", "dot") or info["calls_dot"]
            or any(k in special for k in ("cudnn", "conv", "gemm", "cublas", "matmul"))):
        return "convolution/matmul"
    if opcode in ("gather", "scatter") or "gather" in info["op_name"].split("/")[-1]:
        return "gather/scatter"
    if opcode in ("reduce-window", "select-and-scatter"):
        return "reduce-window"
    if opcode in ("copy", "transpose", "copy-start", "copy-done"):
        return "copy/transpose"
    if opcode == "fusion":
        return {"kloop": "fusion (loop)", "kinput": "fusion (reduction)", "koutput": "fusion (output)"}.get(
            kind, f"fusion ({kind or 'other'})")
    if opcode == "custom-call":
        return f"custom-call {info['kind']}"
    return opcode


def _stats(event) -> dict[str, Any]:
    try:
        return dict(event.stats)
    except Exception:  # noqa: BLE001 - a stat whose value the binding cannot convert
        return {}


def _leaf_events(events: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Drop events that enclose another event of the same line (a parent thunk and its children
    would otherwise count twice). events: (start_ns, duration_ns, hlo_op)."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    keep = []
    for i, (start, dur, name) in enumerate(events):
        nxt = events[i + 1] if i + 1 < len(events) else None
        if nxt is not None and nxt[0] >= start and nxt[0] + nxt[1] <= start + dur and nxt[1] < dur:
            continue  # encloses the next event: a parent
        keep.append((start, dur, name))
    return keep


def collect_op_times(profile, module: str | None) -> tuple[dict[str, float], dict[str, Any]]:
    """{hlo_op: total ns} for `module`'s ops in a `jax.profiler.ProfileData`, and where they came
    from ({"planes": [...], "lines": {line: ns}, "module_matched": bool, "devices": n}).

    With several device planes (a step on several GPUs: each runs the same program) the times
    are one device's: the mean over the `devices` planes (they were summed until 2026-12-07,
    4 GPUs' 10 ms kernel reported as 40 ms against a 10 ms step)."""
    def gather(match_module: bool):
        per_plane = collections.OrderedDict()
        for plane in profile.planes:
            lines = {}
            for line in plane.lines:
                events = []
                for ev in line.events:
                    st = _stats(ev)
                    op = st.get("hlo_op")
                    if op is None and line.name == "XLA Ops":
                        op = ev.name
                    if op is None:
                        continue
                    mod = str(st.get("hlo_module", ""))
                    if match_module and module and mod and not mod.startswith(module):
                        continue
                    events.append((float(ev.start_ns), float(ev.duration_ns), str(op)))
                if events:
                    lines[line.name] = _leaf_events(events)
            if lines:
                per_plane[plane.name] = lines
        return per_plane

    per_plane = gather(True)
    matched = bool(per_plane)
    if not per_plane:
        per_plane = gather(False)
    device_planes = [p for p in per_plane if p.startswith("/device:")]
    planes = device_planes or list(per_plane)
    totals: dict[str, float] = collections.defaultdict(float)
    line_totals = {}
    devices = max(1, len(device_planes))  # each runs the same program: one device's time is the mean
    for p in planes:
        lines = per_plane[p]
        # a derived "XLA Ops" line repeats the kernels of the stream lines: use it alone
        chosen = {"XLA Ops": lines["XLA Ops"]} if "XLA Ops" in lines else lines
        for line_name, events in chosen.items():
            line_totals[f"{p} | {line_name}"] = sum(e[1] for e in events)
            for _, dur, op in events:
                totals[op] += dur / devices
    return dict(totals), {"planes": planes, "lines": line_totals, "module_matched": matched,
                          "devices": devices}


def summarize(op_ns: dict[str, float], instructions: dict[str, dict[str, str]], steps: int,
              *, top: int = 15, wall_ms_per_step: float | None = None) -> dict[str, Any]:
    """Per-step milliseconds by scope x pass, by kind, and the `top` ops (JSON-able)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    by_scope = collections.defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0})
    by_kind = collections.defaultdict(float)
    ops = []
    for op, ns in op_ns.items():
        ms = ns / 1e6 / steps
        info = instructions.get(op)
        scope, direction = scope_of(info["op_name"]) if info else ("other", "fwd")
        kind = kind_of(info)
        by_scope[scope][direction] += ms
        by_kind[kind] += ms
        ops.append({"op": op, "ms": ms, "scope": scope, "pass": direction, "kind": kind,
                    "op_name": info["op_name"] if info else ""})
    total = sum(o["ms"] for o in ops)
    order = {s: i for i, s in enumerate(SCOPES + ("other",))}
    scopes = [{"scope": s, "fwd_ms": v["fwd"], "bwd_ms": v["bwd"], "ms": v["fwd"] + v["bwd"]}
              for s, v in sorted(by_scope.items(), key=lambda kv: order.get(kv[0], len(order)))]
    kinds = [{"kind": k, "ms": v} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    ops.sort(key=lambda o: -o["ms"])
    return {"steps": steps, "busy_ms_per_step": total, "wall_ms_per_step": wall_ms_per_step,
            "num_ops": len(ops), "unattributed_ops": sum(1 for o in ops if o["kind"] == "unknown"),
            "scopes": scopes, "kinds": kinds, "top_ops": ops[:top]}


def summarize_trace(trace_dir, hlo_text: str, steps: int, **kwargs) -> dict[str, Any]:
    """`summarize` of the newest trace under `trace_dir` for the module of `hlo_text`."""
    import jax

    path = newest_xplane(trace_dir)
    profile = jax.profiler.ProfileData.from_file(str(path))
    module = hlo_module_name(hlo_text)
    op_ns, source = collect_op_times(profile, module)
    if not op_ns:
        raise ValueError(f"{path}: no events with an hlo_op stat (no XLA ops were traced)")
    instructions = hlo_instructions(hlo_text)
    summary = summarize(op_ns, instructions, steps, **kwargs)
    summary.update(trace=str(path), module=module, source=source)
    if not any(_SCOPE_RE.search(i["op_name"]) for i in instructions.values()):
        summary["warning"] = ("the HLO's op metadata names none of the scopes (a program read from a "
                              "compilation cache keyed without metadata, compiled before the scopes?)")
    return summary


def _pct(ms: float, total: float) -> str:
    return f"{100.0 * ms / total:.1f}" if total > 0 else "n/a"


def markdown(summary: dict[str, Any]) -> str:
    """The summary as three markdown tables (scopes, kinds, top ops), or, for the {"error": why}
    a benchmark records when the summary could not be made, one line saying why."""
    if "error" in summary:
        return f"no profile summary: {summary['error']}"
    total = summary["busy_ms_per_step"]
    wall = summary.get("wall_ms_per_step")
    devices = (summary.get("source") or {}).get("devices", 1)
    head = (f"XLA op time per step: {total:.2f} ms summed over ops"
            + (f", one device's (the mean of {devices})" if devices > 1 else "")
            + f" ({summary['num_ops']} distinct ops, {summary['steps']} traced steps"
            + (f"; step wall time {wall:.2f} ms" if wall else "") + ")")
    if summary.get("source") and not summary["source"].get("module_matched", True):
        head += "; WARNING: no event named the step's HLO module, all traced ops counted"
    if summary.get("warning"):
        head += f"; WARNING: {summary['warning']}"
    rows = [head, "", "| scope | fwd ms | bwd ms | total ms | % |", "|---|---|---|---|---|"]
    for s in summary["scopes"]:
        rows.append(f"| {s['scope']} | {s['fwd_ms']:.2f} | {s['bwd_ms']:.2f} | {s['ms']:.2f} | {_pct(s['ms'], total)} |")
    rows += ["", "| kind | ms | % |", "|---|---|---|"]
    for k in summary["kinds"]:
        rows.append(f"| {k['kind']} | {k['ms']:.2f} | {_pct(k['ms'], total)} |")
    rows += ["", "| op | kind | scope | pass | ms | % |", "|---|---|---|---|---|---|"]
    for o in summary["top_ops"]:
        rows.append(f"| {o['op']} | {o['kind']} | {o['scope']} | {o['pass']} | {o['ms']:.3f} | {_pct(o['ms'], total)} |")
    return "\n".join(rows)

