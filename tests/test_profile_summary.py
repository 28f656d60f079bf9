"""profile_summary: HLO metadata parsing, scope / pass / kind attribution, and a real CPU trace."""

import jax
import jax.numpy as jnp
import pytest

from xdistill_jax import profile_summary as ps

# A hand-written optimised-HLO excerpt in XLA's text format: a fusion whose own line has no
# metadata (its called computation's ROOT has), a cuDNN convolution custom call, a kCustom
# fusion around a dot, and a plain copy.
HLO = """HloModule jit_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_computation.7 (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  %neg.1 = f32[8]{0} negate(%param_0), metadata={op_name="jit(train_step)/jvp(photometric)/vmap(warp)/neg"}
  ROOT %mul.3 = f32[8]{0} multiply(%neg.1, %param_0), metadata={op_name="jit(train_step)/transpose(jvp(photometric))/reprojection/mul"}
}

%gemm_computation (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (Arg_0.1: f32[8]) -> f32[8] {
  %Arg_0.1 = f32[8]{0} parameter(0), metadata={op_name="x"}
  %loop_multiply_fusion = f32[8]{0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation.7
  %custom-call.2 = (f32[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/conv_general_dilated"}
  %gemm_fusion.1 = f32[4,4]{1,0} fusion(%c, %d), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(train_step)/optimizer/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %copy.4 = f32[8]{0} copy(%loop_multiply_fusion), metadata={op_name="jit(train_step)/jvp(pose_net)/copy"}
}
"""


def test_hlo_instructions_reads_opcode_kind_and_op_name():
    ins = ps.hlo_instructions(HLO)
    assert ps.hlo_module_name(HLO) == "jit_train_step"
    fusion = ins["loop_multiply_fusion"]
    assert (fusion["opcode"], fusion["kind"]) == ("fusion", "kLoop")
    # no metadata on the fusion line: the ROOT of the computation it calls names it
    assert fusion["op_name"] == "jit(train_step)/transpose(jvp(photometric))/reprojection/mul"
    conv = ins["custom-call.2"]
    assert (conv["opcode"], conv["kind"]) == ("custom-call", "__cudnn$convForward")
    gemm = ins["gemm_fusion.1"]
    assert (gemm["kind"], gemm["backend"], gemm["calls_dot"]) == ("kCustom", "__triton_gemm", "1")
    assert ins["copy.4"]["opcode"] == "copy"
    assert ins["Arg_0.1"]["op_name"] == "x"


def test_scope_pass_and_kind():
    assert ps.scope_of("jit(train_step)/transpose(jvp(photometric))/vmap(warp)/reduce_sum") == ("warp", "bwd")
    assert ps.scope_of("jit(train_step)/jvp(depth_net)/DepthNet/encoder/conv1/conv_general_dilated") == (
        "depth_net", "fwd")
    assert ps.scope_of("jit(train_step)/optimizer/mul") == ("optimizer", "fwd")
    assert ps.scope_of("jit(train_step)/convert_element_type") == ("other", "fwd")
    # a scope name inside another word is not that scope
    assert ps.scope_of("jit(train_step)/warped_thing/add")[0] == "other"
    ins = ps.hlo_instructions(HLO)
    assert ps.kind_of(ins["custom-call.2"]) == "convolution/matmul"
    assert ps.kind_of(ins["gemm_fusion.1"]) == "convolution/matmul"
    assert ps.kind_of(ins["loop_multiply_fusion"]) == "fusion (loop)"
    assert ps.kind_of(ins["copy.4"]) == "copy/transpose"
    assert ps.kind_of(None) == "unknown"


def test_summarize_sums_per_step_by_scope_and_kind():
    ins = ps.hlo_instructions(HLO)
    # ns over 2 steps: 4 ms conv, 2 ms fusion (bwd reprojection), 1 ms gemm, 1 ms copy, 2 ms unknown
    op_ns = {"custom-call.2": 4e6, "loop_multiply_fusion": 2e6, "gemm_fusion.1": 1e6, "copy.4": 1e6,
             "mystery.1": 2e6}
    s = ps.summarize(op_ns, ins, steps=2, top=3)
    assert s["busy_ms_per_step"] == pytest.approx(5.0)
    scopes = {r["scope"]: r for r in s["scopes"]}
    assert scopes["depth_net"] == {"scope": "depth_net", "fwd_ms": 2.0, "bwd_ms": 0.0, "ms": 2.0}
    assert scopes["reprojection"]["bwd_ms"] == pytest.approx(1.0) and scopes["reprojection"]["fwd_ms"] == 0
    assert scopes["optimizer"]["ms"] == pytest.approx(0.5) and scopes["pose_net"]["ms"] == pytest.approx(0.5)
    assert scopes["other"]["ms"] == pytest.approx(1.0)  # the op the HLO does not know
    assert [r["scope"] for r in s["scopes"]] == ["depth_net", "pose_net", "reprojection", "optimizer", "other"]
    kinds = {k["kind"]: k["ms"] for k in s["kinds"]}
    assert kinds == pytest.approx({"convolution/matmul": 2.5, "fusion (loop)": 1.0, "copy/transpose": 0.5,
                                   "unknown": 1.0})
    assert s["unattributed_ops"] == 1
    assert [o["op"] for o in s["top_ops"]] == ["custom-call.2", "loop_multiply_fusion", "mystery.1"]
    text = ps.markdown(s)
    assert "| depth_net | 2.00 | 0.00 | 2.00 | 40.0 |" in text
    with pytest.raises(ValueError, match="steps"):
        ps.summarize(op_ns, ins, steps=0)


def test_leaf_events_drop_enclosing_parents():
    # a parent (0..10) around two children, then a sibling: only the three leaves remain
    events = [(0.0, 10.0, "call.1"), (1.0, 3.0, "a"), (5.0, 4.0, "b"), (12.0, 2.0, "c")]
    assert [e[2] for e in ps._leaf_events(events)] == ["a", "b", "c"]


def test_trace_of_a_jitted_function(tmp_path):
    """A real XLA:CPU trace: a large matmul under depth_net dominates a small elementwise op under
    distill; both passes of the matmul are seen."""
    def f(w, x):
        with jax.named_scope("depth_net"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("distill"):
            return jnp.mean(y[:1, :8] ** 2)

    step = jax.jit(jax.grad(f))
    w = jnp.ones((512, 512), jnp.float32) * 1e-3
    x = jnp.ones((512, 512), jnp.float32)
    compiled = step.lower(w, x).compile()
    compiled(w, x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            compiled(w, x).block_until_ready()
    s = ps.summarize_trace(tmp_path, compiled.as_text(), steps=3)
    scopes = {r["scope"]: r for r in s["scopes"]}
    assert s["source"]["module_matched"]
    assert scopes["depth_net"]["fwd_ms"] > 0 and scopes["depth_net"]["bwd_ms"] > 0
    assert scopes["depth_net"]["ms"] > 0.5 * s["busy_ms_per_step"]
    assert any(k["kind"] == "convolution/matmul" for k in s["kinds"])
    assert "warning" not in s
    # an HLO whose metadata names none of the scopes (e.g. stale, from a cache keyed without
    # metadata): everything is "other", and the summary says why
    bare = jax.jit(jax.grad(lambda w, x: jnp.mean(jnp.tanh(x @ w)))).lower(w, x).compile()
    s = ps.summarize_trace(tmp_path, bare.as_text(), steps=3)
    assert "scopes" in s["warning"] and "WARNING" in ps.markdown(s)
    with pytest.raises(FileNotFoundError, match="xplane"):
        ps.newest_xplane(tmp_path / "missing")


def test_several_devices_give_one_devices_time():
    """A step on 4 GPUs: each device plane runs the same 10 ms kernel per step. The op times
    are one device's, 10 ms, and the header says so (they were summed: 40 ms against a 10 ms
    step, until 2026-12-07)."""
    from types import SimpleNamespace as NS

    def ev(op):
        return NS(name=op, start_ns=0.0, duration_ns=10e6, stats=[("hlo_op", op), ("hlo_module", "jit_train_step(1)")])

    planes = [NS(name=f"/device:GPU:{d}", lines=[NS(name="XLA Ops", events=[ev("copy.4")])]) for d in range(4)]
    op_ns, source = ps.collect_op_times(NS(planes=planes), "jit_train_step")
    assert op_ns == {"copy.4": pytest.approx(10e6)} and source["devices"] == 4
    summary = ps.summarize(op_ns, ps.hlo_instructions(HLO), steps=1, wall_ms_per_step=10.0)
    summary["source"] = source
    assert summary["busy_ms_per_step"] == pytest.approx(10.0)
    assert ps.markdown(summary).splitlines()[0].startswith(
        "XLA op time per step: 10.00 ms summed over ops, one device's (the mean of 4) (1 distinct ops")
    one = [NS(name="/device:GPU:0", lines=[NS(name="XLA Ops", events=[ev("copy.4")])])]
    assert ps.collect_op_times(NS(planes=one), "jit_train_step")[0] == {"copy.4": pytest.approx(10e6)}
