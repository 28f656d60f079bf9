"""hlo_census: shape bytes, kernels and their bytes from optimised HLO, summary arithmetic."""

import jax
import jax.numpy as jnp
import pytest

from xdistill_jax import hlo_census as hc

# Hand-written optimised HLO (XLA's text format): a fusion reading one parameter twice, a cuDNN
# convolution returning (result, u8 scratch) read through get-tuple-element, a copy, a tuple.
HLO = """HloModule jit_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_computation.7 (param_0: f32[8], param_1: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  ROOT %mul.3 = f32[8]{0} multiply(%param_0, %param_1), metadata={op_name="jit(train_step)/transpose(jvp(photometric))/reprojection/mul"}
}

ENTRY %main.9 (Arg_0.1: f32[8], Arg_1.1: bf16[2,4,4,3], Arg_2.1: bf16[3,3,3,16]) -> (f32[8], bf16[2,4,4,16]) {
  %Arg_0.1 = f32[8]{0} parameter(0), metadata={op_name="x"}
  %Arg_1.1 = bf16[2,4,4,3]{3,2,1,0} parameter(1)
  %Arg_2.1 = bf16[3,3,3,16]{3,2,1,0} parameter(2)
  %loop_multiply_fusion = f32[8]{0} fusion(%Arg_0.1, %Arg_0.1), kind=kLoop, calls=%fused_computation.7
  %cudnn-conv.2 = (bf16[2,4,4,16]{3,2,1,0}, u8[4096]{0}) custom-call(%Arg_1.1, /*index=1*/%Arg_2.1), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/conv_general_dilated"}
  %get-tuple-element.1 = bf16[2,4,4,16]{3,2,1,0} get-tuple-element(%cudnn-conv.2), index=0
  %copy.4 = f32[8]{0} copy(%loop_multiply_fusion), metadata={op_name="jit(train_step)/optimizer/copy"}
  ROOT %tuple.5 = (f32[8]{0}, bf16[2,4,4,16]{3,2,1,0}) tuple(%copy.4, %get-tuple-element.1)
}
"""


def test_shape_bytes():
    assert hc.shape_bytes("f32[12,192,640]{2,1,0}") == 12 * 192 * 640 * 4
    assert hc.shape_bytes("f32[]") == 4
    assert hc.shape_bytes("(bf16[2,3]{1,0}, u8[100]{0})") == 12
    assert hc.shape_bytes("(bf16[2,3]{1,0}, u8[100]{0})", scratch=True) == 112
    assert hc.shape_bytes("(pred[5], s32[2], token[])") == 5 + 8
    with pytest.raises(ValueError, match="q7"):
        hc.shape_bytes("q7[3]")


def test_kernels_of_hand_written_hlo():
    ks = {k["name"]: k for k in hc.kernels(HLO)}
    assert list(ks) == ["loop_multiply_fusion", "cudnn-conv.2", "copy.4"]  # no parameter/gte/tuple
    fusion = ks["loop_multiply_fusion"]
    # result 32 B + the one distinct operand 32 B (read twice, charged once)
    assert (fusion["bytes"], fusion["out_bytes"]) == (64, 32)
    assert (fusion["scope"], fusion["pass"], fusion["kind"]) == ("reprojection", "bwd", "fusion (loop)")
    conv = ks["cudnn-conv.2"]
    # result 2*4*4*16 x 2 B = 1024 (scratch not counted) + input 2*4*4*3 x 2 = 192 + kernel 3*3*3*16 x 2 = 864
    assert conv["bytes"] == 1024 + 192 + 864
    assert (conv["scope"], conv["kind"]) == ("depth_net", "convolution/matmul")
    assert (ks["copy.4"]["bytes"], ks["copy.4"]["scope"]) == (64, "optimizer")


def test_an_async_collective_is_one_kernel_its_done_a_wait():
    """XLA:GPU writes an all-reduce as an "-start"/"-done" pair: one launch, the "-done" only
    waits for it (as `collectives` reads them). Counted twice until 2026-12-07: 2 kernels and
    16 MB for one all-reduce of 4 MB."""
    text = """HloModule m
%region (a: f32[], b: f32[]) -> f32[] {
  ROOT %add = f32[] add(%a, %b)
}
ENTRY %main (p: f32[1000000]) -> f32[1000000] {
  %p = f32[1000000]{0} parameter(0)
  %all-reduce-start = f32[1000000]{0} all-reduce-start(%p), replica_groups={{0,1,2,3}}, to_apply=%region
  ROOT %all-reduce-done = f32[1000000]{0} all-reduce-done(%all-reduce-start)
}
"""
    ks = hc.kernels(text)
    assert [(k["name"], k["bytes"]) for k in ks] == [("all-reduce-start", 8_000_000)]  # 4 MB in, 4 MB out
    assert hc.summarize(ks)["kernels"] == 1
    assert len(hc.collectives(text)) == 1


def test_summary_totals_and_roofline():
    s = hc.summarize(hc.kernels(HLO), bandwidth=1e9, top=2)
    assert s["kernels"] == 3 and s["bytes"] == 64 + 2080 + 64
    assert s["roofline_ms"] == pytest.approx(2208 / 1e9 * 1e3)
    scopes = {x["scope"]: x for x in s["scopes"]}
    assert scopes["reprojection"]["bwd_bytes"] == 64 and scopes["reprojection"]["fwd_bytes"] == 0
    assert scopes["depth_net"]["bytes"] == 2080
    assert [k["name"] for k in s["top"]] == ["cudnn-conv.2", "loop_multiply_fusion"]
    assert sum(k["bytes"] for k in s["kinds"]) == s["bytes"]
    text = hc.markdown(s)
    assert "3 kernels" in text and "| depth_net | 1 |" in text
    assert s["small_kernels"] == {"depth_net": 1, "optimizer": 1, "reprojection": 1}  # all < 0.2 MB
    assert "Small kernels (each moving < 0.2 MB" in text and ": 3 (depth_net 1, optimizer 1, reprojection 1)" in text
    s = hc.summarize(hc.kernels(HLO), small_bytes=100)  # the two 64-byte kernels, not the 2080
    assert s["small_kernels"] == {"optimizer": 1, "reprojection": 1}
    assert ": 2 (optimizer 1, reprojection 1)" in hc.markdown(s)
    assert "Small kernels (each moving < 0.0001 MB" in hc.markdown(s)
    assert hc.summarize(hc.kernels(HLO), small_bytes=64)["small_kernels"] == {}  # strictly fewer


# GPU program lines as XLA writes them (optimised HLO of the 2026-12-04 H200 run, shapes cut down):
# the translator's dilated-conv weight gradient as a forward convolution over a 48x160 window,
# then an ordinary backward-filter and forward convolution with 3x3 windows.
WIDE_HLO = """HloModule jit_train_step

ENTRY %main.3 (a: bf16[12,56,168,32], g: bf16[12,48,160,32], w: bf16[32,3,3,32]) -> bf16[32,3,3,32] {
  %a = bf16[12,56,168,32]{3,2,1,0} parameter(0)
  %g = bf16[12,48,160,32]{3,2,1,0} parameter(1)
  %w = bf16[32,3,3,32]{3,2,1,0} parameter(2)
  %cudnn-conv.101 = (bf16[32,3,3,32]{3,2,1,0}, u8[15728656]{0}) custom-call(%a, %g), window={size=48x160 stride=4x4 pad=4_4x4_4}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/transpose(jvp(translator))/Translator/conv2/conv_general_dilated"}
  %cudnn-conv-bw-filter.38 = (bf16[32,3,3,32]{3,2,1,0}, u8[0]{0}) custom-call(%a, %g), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(pose_net))/PoseNet/conv_general_dilated"}
  %cudnn-conv.7 = (bf16[12,48,160,32]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/conv_general_dilated"}, backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kNone"}}
  %cudnn-conv.8 = (bf16[12,48,160,32]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(pose_net)/PoseNet/conv_general_dilated"}, backend_config={"operation_queue_id":"1","cudnn_conv_backend_config":{"activation_mode":"kNone"}}
  %cudnn-conv.9 = (bf16[12,48,160,32]{3,2,1,0}, u8[0]{0}) custom-call(%g, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(pose_net)/PoseNet/conv_general_dilated"}, backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kRelu"}}
  %gte = bf16[32,3,3,32]{3,2,1,0} get-tuple-element(%cudnn-conv.101), index=0
  ROOT %add = bf16[32,3,3,32]{3,2,1,0} add(%gte, %w)
}
"""


def test_wide_convolutions_are_listed():
    """A convolution whose window is wider than any kernel of the networks is named: on a GPU it is
    a weight gradient cuDNN's backward-filter kernel did not get (1.5 ms each on an H200)."""
    ks = {k["name"]: k for k in hc.kernels(WIDE_HLO)}
    assert ks["cudnn-conv.101"]["window"] == (48, 160)
    assert ks["cudnn-conv-bw-filter.38"]["window"] == ks["cudnn-conv.7"]["window"] == (3, 3)
    assert ks["add"]["window"] is None
    s = hc.summarize(ks.values())
    assert [(k["name"], k["scope"], k["pass"]) for k in s["wide_convolutions"]] == \
        [("cudnn-conv.101", "translator", "bwd")]
    text = hc.markdown(s)
    assert "Wide convolutions (window over 7x7" in text and "): 1" in text
    assert "- cudnn-conv.101 translator (bwd), window 48x160" in text
    assert "): none" in hc.markdown(hc.summarize(hc.kernels(HLO)))


# Convolutions as XLA:GPU writes them, channels read from the filter through dim_labels: the
# filter is operand 1 of a forward or backward-input convolution, the result of a backward-filter one.
ALIGN_HLO = """HloModule jit_train_step

ENTRY %main.4 (x6: bf16[2,8,8,6], w6: bf16[64,7,7,6], x4: bf16[2,8,8,4], w4: bf16[64,7,7,4], d: bf16[2,8,8,16], g1: bf16[2,8,8,1], gy: bf16[2,8,8,7], wh: bf16[7,1,1,32], xf: f32[2,8,8,3], wf: f32[64,7,7,3], x64: bf16[2,8,8,64], w64: bf16[64,3,3,64], xh: bf16[2,8,8,12], wio: bf16[3,3,12,16]) -> bf16[2,4,4,64] {
  %x6 = bf16[2,8,8,6]{3,2,1,0} parameter(0)
  %w6 = bf16[64,7,7,6]{3,2,1,0} parameter(1)
  %x4 = bf16[2,8,8,4]{3,2,1,0} parameter(2)
  %w4 = bf16[64,7,7,4]{3,2,1,0} parameter(3)
  %d = bf16[2,8,8,16]{3,2,1,0} parameter(4)
  %g1 = bf16[2,8,8,1]{3,2,1,0} parameter(5)
  %gy = bf16[2,8,8,7]{3,2,1,0} parameter(6)
  %wh = bf16[7,1,1,32]{3,2,1,0} parameter(7)
  %xf = f32[2,8,8,3]{3,2,1,0} parameter(8)
  %wf = f32[64,7,7,3]{3,2,1,0} parameter(9)
  %x64 = bf16[2,8,8,64]{3,2,1,0} parameter(10)
  %w64 = bf16[64,3,3,64]{3,2,1,0} parameter(11)
  %xh = bf16[2,8,8,12]{3,2,1,0} parameter(12)
  %wio = bf16[3,3,12,16]{3,2,1,0} parameter(13)
  %pose-stem = (bf16[2,4,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%x6, %w6), window={size=7x7 stride=2x2 pad=3_3x3_3}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(pose_net)/PoseNet/encoder/conv1/conv_general_dilated"}
  %depth-stem = (bf16[2,4,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%x4, %w4), window={size=7x7 stride=2x2 pad=3_3x3_3}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/encoder/conv1/conv_general_dilated"}
  %disp-filter = (bf16[1,3,3,16]{3,2,1,0}, u8[0]{0}) custom-call(%d, %g1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(depth_net))/DepthNet/decoder/dispconv_0/conv_general_dilated"}
  %head-input = (bf16[2,8,8,32]{3,2,1,0}, u8[0]{0}) custom-call(%gy, %wh), window={size=1x1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(train_step)/transpose(jvp(translator))/Translator/head/conv_general_dilated"}
  %fp32-stem = (f32[2,4,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%xf, %wf), window={size=7x7 stride=2x2 pad=3_3x3_3}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/encoder/conv1/conv_general_dilated"}
  %aligned = (bf16[2,8,8,64]{3,2,1,0}, u8[0]{0}) custom-call(%x64, %w64), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/encoder/layer1_0/conv1/conv_general_dilated"}
  %hwio = (bf16[2,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%xh, %wio), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/decoder/upconv_0_0/conv_general_dilated"}
  ROOT %gte = bf16[2,4,4,64]{3,2,1,0} get-tuple-element(%pose-stem), index=0
}
"""


def test_unaligned_16_bit_convolutions_are_listed():
    """Channels from the filter (operand 1, or a backward-filter's result) by its dim_labels:
    the 16-bit ones off a multiple of 8 are listed, 4 input channels (a padded image) allowed,
    float32 and aligned ones not."""
    ks = {k["name"]: k for k in hc.kernels(ALIGN_HLO)}
    assert ks["pose-stem"]["channels"] == ("bf16", 6, 64)
    assert ks["disp-filter"]["channels"] == ("bf16", 16, 1)
    assert ks["head-input"]["channels"] == ("bf16", 32, 7)
    assert ks["hwio"]["channels"] == ("bf16", 12, 16)
    assert ks["fp32-stem"]["channels"] == ("f32", 3, 64)
    s = hc.summarize(ks.values())
    assert [k["name"] for k in s["unaligned_convolutions"]] == ["pose-stem", "disp-filter", "head-input", "hwio"]
    text = hc.markdown(s)
    assert "Unaligned 16-bit convolutions (channels in or out not a multiple of 8" in text and "): 4" in text
    assert "- disp-filter depth_net (bwd), bf16 16 -> 1 channels" in text
    assert "): none" in hc.markdown(hc.summarize(hc.kernels(HLO))).split("Unaligned")[1]  # no dim_labels


def test_library_calls_are_counted_by_distinct_configuration():
    """cudnn-conv.7 and .8 are the same convolution (names, metadata and queue aside): a GPU
    autotunes it once; .9 fuses a ReLU (another backend config), the two others differ in shapes
    or target: 5 calls, 4 configurations. Fusions are not library calls."""
    ks = {k["name"]: k for k in hc.kernels(WIDE_HLO)}
    assert ks["cudnn-conv.7"]["config"] == ks["cudnn-conv.8"]["config"]
    assert "bf16[12,48,160,32]{3,2,1,0}" in ks["cudnn-conv.7"]["config"] and "%g" not in ks["cudnn-conv.7"]["config"]
    assert len({ks[n]["config"] for n in ("cudnn-conv.7", "cudnn-conv.9", "cudnn-conv.101",
                                           "cudnn-conv-bw-filter.38")}) == 4
    assert ks["add"]["config"] is None
    s = hc.summarize(ks.values())
    assert (s["library_calls"], s["library_configs"]) == (5, 4)
    assert "5 cuDNN/cuBLAS calls in 4 distinct configurations" in hc.markdown(s)
    s = hc.summarize(hc.kernels(HLO))
    assert (s["library_calls"], s["library_configs"]) == (1, 1)  # its one convolution


def test_undefined_operand_and_loops_are_errors():
    with pytest.raises(ValueError, match="Arg_9"):
        hc.kernels(HLO.replace("fusion(%Arg_0.1, %Arg_0.1)", "fusion(%Arg_0.1, %Arg_9)"))
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, v: jnp.sin(v) * v, x))
    text = loop.lower(jnp.ones((4, 4))).compile().as_text()
    with pytest.raises(ValueError, match="is a (while|call)"):  # XLA:CPU wraps small loops in a call
        hc.kernels(text)


def test_kernels_of_a_compiled_function():
    def f(x, y):
        with jax.named_scope("warp"):
            a = jnp.sum(jnp.exp(x))
        with jax.named_scope("optimizer"):
            b = y * 2.0 + 1.0
        return a, b

    text = jax.jit(f).lower(jnp.ones((64, 128)), jnp.ones((1000,))).compile().as_text()
    ks = hc.kernels(text)
    assert {k["scope"] for k in ks} == {"warp", "optimizer"}
    # the elementwise chain is one kernel: 4000 B in, 4000 B out
    assert [k["bytes"] for k in ks if k["scope"] == "optimizer"] == [8000]
    # the reduction reads all of x and writes (at least) the scalar
    assert sum(k["bytes"] for k in ks if k["scope"] == "warp") >= 64 * 128 * 4 + 4


def test_collectives_of_a_sharded_program():
    """collectives: what a program compiled for several devices communicates, async ones once,
    with the operation each came from; a one-device program has none."""
    text = """HloModule m
%region (a: f32[], b: f32[]) -> f32[] {
  ROOT %add = f32[] add(%a, %b)
}
ENTRY %main (p: f32[2,8]) -> f32[8,8] {
  %p = f32[2,8]{1,0} parameter(0)
  %all-reduce = f32[2,8]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%region, metadata={op_name="jit(f)/transpose(jvp(depth_net))/reduce_sum"}
  %all-gather-start = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%all-reduce), dimensions={0}, metadata={op_name="jit(f)/jvp(pose_net)/reshape"}
  ROOT %all-gather-done = f32[8,8]{1,0} all-gather-done(%all-gather-start)
}
"""
    assert hc.collectives(text) == [
        {"opcode": "all-reduce", "shape": "f32[2,8]{1,0}", "result": "f32[2,8]{1,0}",
         "op_name": "jit(f)/transpose(jvp(depth_net))/reduce_sum"},
        {"opcode": "all-gather", "shape": "(f32[2,8]{1,0}, f32[8,8]{1,0})", "result": "f32[8,8]{1,0}",
         "op_name": "jit(f)/jvp(pose_net)/reshape"},
    ]
    # by opcode, the elements of the results by type: the gather's 64, not its operand's 16 too
    assert hc.collective_totals(hc.collectives(text)) == {
        "all-reduce": {"count": 1, "elements": {"f32": 16}}, "all-gather": {"count": 1, "elements": {"f32": 64}}}
    one_device = jax.jit(lambda x: jnp.sum(x * 2)).lower(jnp.ones((4, 4))).compile().as_text()
    assert hc.collectives(one_device) == []
    combined = ("ENTRY %m (a: f32[3], b: bf16[5]) -> (f32[3], bf16[5]) {\n"
                "  ROOT %all-reduce-start.1 = (f32[3]{0}, bf16[5]{0}) all-reduce-start(%a, %b), to_apply=%r\n}")
    totals = hc.collective_totals(hc.collectives(combined))
    assert totals == {"all-reduce": {"count": 1, "elements": {"f32": 3, "bf16": 5}}}
    assert hc.describe_collectives(totals) == "1 all-reduce (0.00 M bf16, 0.00 M f32)"
    assert hc.describe_collectives({}) == "none"


# A combined all-reduce's result cut apart as XLA:GPU writes it (the 4 x H200 train step's
# lines, shapes cut down): two `wrapped_slice` fusions, and a slice inside a bigger fusion.
SLICE_HLO = """HloModule jit_train_step

%wrapped_slice_computation.1 (param_0.1: f32[1000]) -> f32[64] {
  %param_0.1 = f32[1000]{0} parameter(0), metadata={scheduling_name="param_0.1"}
  ROOT %slice.1 = f32[64]{0} slice(%param_0.1), slice={[0:64]}, metadata={op_name="jit(train_step)/transpose(jvp(depth_net))/DepthNet/encoder/bn1/reduce_sum"}
}

%wrapped_slice_computation.2 (param_0.2: f32[1000]) -> f32[936] {
  %param_0.2 = f32[1000]{0} parameter(0)
  ROOT %slice.2 = f32[936]{0} slice(%param_0.2), slice={[64:1000]}
}

%fused_slice_exp (param_0.3: f32[1000]) -> f32[64] {
  %param_0.3 = f32[1000]{0} parameter(0)
  %slice.3 = f32[64]{0} slice(%param_0.3), slice={[0:64]}
  ROOT %exp.1 = f32[64]{0} exponential(%slice.3)
}

ENTRY %main.4 (p: f32[1000]) -> (f32[64], f32[936], f32[64], f32[10]) {
  %p = f32[1000]{0} parameter(0)
  %wrapped_slice.1 = f32[64]{0} fusion(%p), kind=kLoop, calls=%wrapped_slice_computation.1
  %wrapped_slice.2 = f32[936]{0} fusion(%p), kind=kLoop, calls=%wrapped_slice_computation.2
  %loop_slice_exp_fusion = f32[64]{0} fusion(%p), kind=kLoop, calls=%fused_slice_exp
  %slice.4 = f32[10]{0} slice(%p), slice={[0:10]}
  ROOT %tuple = (f32[64]{0}, f32[936]{0}, f32[64]{0}, f32[10]{0}) tuple(%wrapped_slice.1, %wrapped_slice.2, %loop_slice_exp_fusion, %slice.4)
}
"""


def test_a_kernel_that_is_only_a_slice_reads_what_it_writes():
    """Slicing a buffer reads only the slice: the two wrapped slices move 2 x 64 and 2 x 936
    floats, not the whole 1000-float buffer each (which counted 2.0 GB too many in a 4-GPU
    step). A fusion that does more than slice keeps the whole-operand charge (an estimate)."""
    assert hc.slice_computations(SLICE_HLO) == {"wrapped_slice_computation.1", "wrapped_slice_computation.2"}
    ks = {k["name"]: k["bytes"] for k in hc.kernels(SLICE_HLO)}
    assert ks == {"wrapped_slice.1": 2 * 64 * 4, "wrapped_slice.2": 2 * 936 * 4,
                  "loop_slice_exp_fusion": 64 * 4 + 1000 * 4, "slice.4": 2 * 10 * 4}


# Hand-written TPU-style optimised HLO: libtpu writes its cost model's estimate into each
# instruction's backend config; a reduce-window doing work without one; async copies.
TPU_HLO = """HloModule jit_train_step

ENTRY %main.3_spmd (p0: bf16[3,96,320,16], p1: f32[3,194,642,3]) -> bf16[3,192,640,16] {
  %p0 = bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = f32[3,194,642,3]{2,1,3,0:T(8,128)} parameter(1)
  %copy-start.1 = (bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)S(1)}, bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)}, u32[]) copy-start(%p0)
  %copy-done.1 = bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %reduce-window.2 = f32[3,192,640,3]{2,1,3,0:T(8,128)} reduce-window(%p1, %p1), window={size=1x3x3x1}, metadata={op_name="jit(train_step)/jvp(photometric)/vmap(reprojection)/reduce_window_sum"}
  %fusion.4 = bf16[3,192,640,16]{3,2,1,0:T(8,128)(2,1)} fusion(%copy-done.1), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/jvp(depth_net)/DepthNet/decoder/dot_general"}, backend_config={"flag_configs":[],"estimated_cycles":"3000"}
  %fusion.5 = bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)} fusion(%fusion.4), kind=kLoop, calls=%g, metadata={op_name="jit(train_step)/transpose(jvp(depth_net))/DepthNet/decoder/add_any"}, backend_config={"flag_configs":[],"estimated_cycles":"1500"}
  %copy.6 = bf16[3,96,320,16]{3,2,1,0:T(8,128)(2,1)} copy(%fusion.5), metadata={op_name="jit(train_step)/optimizer/copy"}, backend_config={"estimated_cycles":"500"}
  %add.7 = u32[1]{0:T(128)} add(%p0, %p0)
  ROOT %fusion.8 = bf16[3,192,640,16]{3,2,1,0:T(8,128)(2,1)} fusion(%copy.6), kind=kLoop, calls=%h, backend_config={"estimated_cycles":"1000"}
}
"""


def test_estimated_cycles_of_hand_written_tpu_hlo():
    """libtpu's estimated cycles summed by scope and pass and by opcode; an instruction moving
    real bytes without an estimate is named (the reduce-window), a tiny one (a u32 add) and the
    async copies are not."""
    e = hc.estimated_cycles(TPU_HLO)
    assert e["cycles"] == 3000 + 1500 + 500 + 1000
    assert e["scopes"] == {"depth_net": {"fwd": 3000, "bwd": 1500}, "optimizer": {"fwd": 500, "bwd": 0},
                           "other": {"fwd": 1000, "bwd": 0}}
    assert e["opcodes"] == {"fusion": 5500, "copy": 500}
    assert e["unestimated"] == {"reduce-window": 1}
    assert e["top"] == ["fusion.4", "fusion.5", "fusion.8", "copy.6"]
    text = hc.cycles_markdown(e, 1.5e9)
    assert text.startswith("0.0 M cycles estimated by libtpu, 0.00 ms at 1.5 GHz (not estimated: 1 reduce-window)")
    assert "| depth_net | 0.00 | 0.00 | 0.00 (75.0) |" in text  # 4500 of 6000 cycles
    with pytest.raises(ValueError, match="while"):
        hc.estimated_cycles(TPU_HLO.replace("%add.7 = u32[1]{0:T(128)} add(%p0, %p0)",
                                            "%add.7 = u32[1]{0:T(128)} while(%p0), condition=%c, body=%b"))
