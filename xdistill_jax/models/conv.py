"""A 2-D convolution whose kernel can be stored OHWI: the layout cuDNN computes it in.

`flax.linen.Conv` stores its kernel HWIO (row-major). On a GPU, XLA runs the NHWC convolutions
through cuDNN with the filter in OHWI order (bf16 and, on the H100 target, fp32 too), and
cuDNN's filter gradient comes out OHWI. With HWIO weights every trained convolution then pays,
per step, a transposing Adam update that cannot update in place and a copy of each of the new
weight, mu and nu into the donated buffers (benchmarks/RESULTS.md, "Where the other scope
goes"). Stored OHWI they are plain in-place elementwise updates. XLA:CPU is the mirror image:
its convolutions take HWIO filters, and OHWI kernels made the CPU's train step 1.5x as slow
(transposing Adam updates and filter gradients), so the training config's "auto" layout is
OHWI on a GPU or TPU and HWIO on the CPU (`config_defaults.kernel_layout_for`).

`Conv` is `flax.linen.Conv` (2-D, shared weights, no feature groups) with a `kernel_layout`:
"OHWI" or "HWIO" (flax's, hence checkpoints written before the layout existed:
`config_defaults.LEGACY_KERNEL_LAYOUT`). The kernel is drawn by `kernel_init` in HWIO and transposed, so
both layouts hold the same numbers for the same key; the convolution is the same
`lax.conv_general_dilated` with the kernel's dimension numbers, so the two compute the same
function. They round alike, not always bitwise alike: XLA lays out and fuses the two programs
differently (on the CPU the first train step is bitwise the same, later ones differ at rounding
level; tests/test_train_step.py).

Dilated convolutions (the translator's) run as plain convolutions over the batch of the input's
interleaved sub-grids (`conv_nhwc`): the same function, forward bitwise on the CPU, and on an
H200 about 3 ms off a 23 ms bf16 step (their weight gradients leave a slow path of XLA:GPU).

On a GPU, a 16-bit convolution whose channel counts cuDNN's tensor-core kernels do not take
(the stems' 3 and 6 input channels, the pose decoder's 12 outputs, the translator head's classes)
runs with zero channels added to its input and kernel and its extra outputs dropped
(`tensor_core_channels`, `conv_padded_channels`): the same sums. XLA:GPU pads f16 convolutions
so, not bf16 ones; NVIDIA's convolution guide asks for channels in multiples of 8 (4 for an
image's 3 at stride 2) in 16-bit. The kernel parameter keeps its shape; `model.gpu_channel_padding`
turns it off (`platform_forms.channel_padding`).

With a low-precision `dtype` (bf16 over float32 weights) and the batch sharded over several
devices (`platform_forms.data_mesh`), the devices' weight and bias gradients are summed in
float32 (`models.grad_sum`), not in bf16 where XLA's partitioner would add them.

On the CPU, a convolution whose window is wider than 1 along an axis where its input or output
has extent 1 (the last ResNet stage and the decoders' first layers at the demo's 32x96: 1x3
maps) runs as one matrix product, im2col (`conv_taps`, `degenerate_on_cpu`): XLA:CPU's
convolution took 11.3 ms for one such 3x3 512-channel layer at batch 4 (0.44 ms as one matrix
product) and 28.7 ms with its gradients (1.8 ms), and transposed and reversed the kernel again each
step for the input gradient (benchmarks/RESULTS.md, "Convolutions over 1-pixel-wide maps on the
CPU"). The same sums in another order (rounding-level differences); a GPU or TPU keeps the
convolution.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

from xdistill_jax import platform_forms
from xdistill_jax.models import grad_sum

# HWIO -> the layout (transpose permutations), and back (the inverse permutations).
TO_LAYOUT = {"OHWI": (3, 0, 1, 2), "HWIO": (0, 1, 2, 3)}
FROM_LAYOUT = {k: tuple(p.index(i) for i in range(4)) for k, p in TO_LAYOUT.items()}
KERNEL_LAYOUTS = tuple(TO_LAYOUT)


def check_kernel_layout(layout: str) -> str:
    if layout not in KERNEL_LAYOUTS:
        raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {layout!r}")
    return layout


def hwio_to(layout: str, kernel):
    """An HWIO kernel (numpy or jax array) in `layout`."""
    return kernel.transpose(TO_LAYOUT[check_kernel_layout(layout)])


def to_hwio(layout: str, kernel):
    """A kernel stored in `layout`, as HWIO."""
    return kernel.transpose(FROM_LAYOUT[check_kernel_layout(layout)])


def hwio_tree_to(layout: str, tree):
    """A variables tree (nested dicts) whose 4-D ``kernel`` leaves are HWIO, with them in `layout`.

    For weight files, which hold flax's HWIO (`convert.save_variables`), going into networks built
    with `kernel_layout=layout`. Other leaves are returned as they are.
    """
    check_kernel_layout(layout)

    def walk(node):
        return {k: walk(v) if isinstance(v, dict) else
                (hwio_to(layout, v) if k == "kernel" and getattr(v, "ndim", 0) == 4 else v)
                for k, v in node.items()}

    return walk(dict(tree))


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


def conv_nhwc(x, kernel, layout: str, strides=(1, 1), padding: Any = "SAME",
              dilation=(1, 1), precision: Any = None) -> jax.Array:
    """NHWC convolution of `x` with a kernel stored in `layout`; dilated ones as space-to-batch.

    A stride-1 convolution with kernel dilation d is computed on the d x d interleaved sub-grids
    of the padded input, stacked along the batch: a plain convolution (dilation 1, VALID) of
    d*d times the batch, whose outputs interleave back into the dilated one (TensorFlow's
    atrous convolution). The same sums, so the same function, with the same parameters.
    Why: XLA:GPU does not turn the weight gradient of a dilated convolution into cuDNN's
    backward-filter kernel; it runs it as a forward convolution whose window is the whole
    feature map (48x160 for the translator at 640x192), 1.5 ms per layer on an H200
    (benchmarks/RESULTS.md, 2026-12-04), against microseconds for the batched form.
    Other strides keep lax's `rhs_dilation`.
    """
    dh, dw = dilation
    strides = tuple(strides)
    if (dh, dw) == (1, 1) or strides != (1, 1):
        return jax.lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=(dh, dw),
                                            dimension_numbers=("NHWC", layout, "NHWC"),
                                            precision=precision)
    kh, kw = (kernel.shape[layout.index("H")], kernel.shape[layout.index("W")])
    b, h, w, c = x.shape
    (plh, phh), (plw, phw) = _explicit_padding(padding, (h, w), ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
                                               (1, 1))
    hp, wp = h + plh + phh, w + plw + phw
    out_h, out_w = hp - dh * (kh - 1), wp - dw * (kw - 1)
    eh, ew = -hp % dh, -wp % dw  # pad the ends to multiples of d (outputs there are cropped)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                    ((0, 0, 0), (plh, phh + eh, 0), (plw, phw + ew, 0), (0, 0, 0)))
    hq, wq = (hp + eh) // dh, (wp + ew) // dw
    x = x.reshape(b, hq, dh, wq, dw, c)
    # Example-major (b, dh, dw): each example's sub-grids stay with it, so a batch sharded over
    # devices stays sharded (sub-grid-major needs an all-gather of the whole batch). A batch on
    # one device keeps sub-grid-major: the same sums, but the weight gradient adds them in
    # another order, and the one-device step stays the program the demo's figures were measured
    # with.
    example_major = platform_forms.batch_devices() != 1
    x = x.transpose((0, 2, 4, 1, 3, 5) if example_major else (2, 4, 0, 1, 3, 5)).reshape(b * dh * dw, hq, wq, c)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", layout, "NHWC"),
                                     precision=precision)
    _, oh, ow, f = y.shape
    if example_major:
        y = y.reshape(b, dh, dw, oh, ow, f).transpose(0, 3, 1, 4, 2, 5)
    else:
        y = y.reshape(dh, dw, b, oh, ow, f).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(b, oh * dh, ow * dw, f)[:, :out_h, :out_w]


def _explicit_padding(padding: Any, in_hw: tuple[int, int], kernel_hw: tuple[int, int],
                      strides: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, str):
        return tuple(tuple(p) for p in jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def degenerate_on_cpu(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides=(1, 1),
                      padding: Any = "SAME", dilation=(1, 1)) -> bool:
    """Whether a convolution is one XLA:CPU runs slowly and `conv_taps` computes instead on the
    CPU: an undilated window wider than 1 along an axis where the input or the output has extent 1
    (a 3x3 convolution over a 1x3 map, or a stride-2 one onto a 1x3 map)."""
    if tuple(dilation) != (1, 1):
        return False
    strides = tuple(strides)
    (plh, phh), (plw, phw) = _explicit_padding(padding, in_hw, kernel_hw, strides)
    out_hw = ((in_hw[0] + plh + phh - kernel_hw[0]) // strides[0] + 1,
              (in_hw[1] + plw + phw - kernel_hw[1]) // strides[1] + 1)
    return any(k > 1 and (n == 1 or o == 1) for n, o, k in zip(in_hw, out_hw, kernel_hw))


def conv_taps(x, kernel, layout: str, strides=(1, 1), padding: Any = "SAME",
              precision: Any = None) -> jax.Array:
    """An undilated NHWC convolution as one matrix product: the strided slices of the padded
    input under each kernel tap, side by side (im2col), times the kernel as a (taps x Cin) x Cout
    matrix. The same function as `lax.conv_general_dilated` (the same products, added in another
    order); its weight gradient is one product too. Products of 16-bit inputs are accumulated in
    float32 and rounded once, as a convolution's are."""
    w = to_hwio(layout, kernel)
    kh, kw, _, cout = w.shape
    b, h, wd, c = x.shape
    strides = tuple(strides)
    (plh, phh), (plw, phw) = _explicit_padding(padding, (h, wd), (kh, kw), strides)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (plh, phh, 0), (plw, phw, 0), (0, 0, 0)))
    hp, wp = x.shape[1:3]
    sh, sw = strides
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else None
    patches = jnp.stack([jax.lax.slice(x, (0, i, j, 0), (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                                       (1, sh, sw, 1))
                         for i in range(kh) for j in range(kw)], axis=3)  # (b, oh, ow, taps, c)
    # as a 2-D product: XLA:CPU then leaves the weight gradient in the kernel's own order (a 4-D
    # dot_general had it come out transposed, which each Adam update of the kernel then undid)
    out = jax.lax.dot_general(patches.reshape(b * oh * ow, kh * kw * c), w.reshape(kh * kw * c, cout),
                              (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=acc).reshape(b, oh, ow, cout)
    return out.astype(jnp.result_type(x.dtype, kernel.dtype))


# XLA:GPU's rule for f16 (CudnnPadForConvolutions): pad a convolution's channels only while
# no operand (input, kernel, output) grows past this factor.
MAX_PADDED_GROWTH = 1.35


def tensor_core_channels(cin: int, cout: int) -> tuple[int, int] | None:
    """(input, output) channel counts a 16-bit convolution runs with on a GPU's tensor cores, or
    None where it runs as it is: XLA:GPU's rule for f16. 3 input channels into 32 or 64 outputs
    (an image into a stem) -> 4 inputs; else both rounded up to multiples of 8, unless that grows
    the input (x pin/cin), the kernel (x pin*pout/(cin*cout)) or the output (x pout/cout) by
    more than `MAX_PADDED_GROWTH`."""
    if cin == 3 and cout in (32, 64):
        pin, pout = 4, cout
    else:
        pin, pout = -(-cin // 8) * 8, -(-cout // 8) * 8
        if max(pin / cin, pout / cout, pin * pout / (cin * cout)) > MAX_PADDED_GROWTH:
            return None
    return None if (pin, pout) == (cin, cout) else (pin, pout)


def conv_padded_channels(conv: Callable, x, kernel, bias, layout: str, pin: int, pout: int):
    """conv(x, kernel) (+ bias) computed with `pin` input and `pout` output channels: zero input
    channels and zero kernel entries added, the extra outputs dropped. The same sums (the added
    terms are exact zeros); the gradients reach only the real channels."""
    cout = kernel.shape[layout.index("O")]
    x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, pin - x.shape[-1]),))
    kernel = jnp.pad(kernel, [(0, pin - n) if d == "I" else (0, pout - n) if d == "O" else (0, 0)
                              for d, n in zip(layout, kernel.shape)])
    y = conv(x, kernel)
    if bias is not None:  # added before the crop: cuDNN's fused convolution + bias keeps it
        y += jnp.pad(bias, (0, pout - cout)).reshape((1, 1, 1, -1))
    return y[..., :cout]


class Conv(nn.Module):
    """NHWC 2-D convolution (+ bias), kernel stored in `kernel_layout`; see the module docstring."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    kernel_layout: str = "OHWI"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        layout = check_kernel_layout(self.kernel_layout)
        if inputs.ndim != 4:
            raise ValueError(f"Conv expects NHWC inputs, got shape {inputs.shape}")
        kh, kw = _pair(self.kernel_size)
        hwio = (kh, kw, inputs.shape[-1], self.features)
        shape = tuple(hwio[i] for i in TO_LAYOUT[layout])

        def init(key, shape_in_layout, dtype=jnp.float32):
            assert tuple(shape_in_layout) == shape
            return hwio_to(layout, self.kernel_init(key, hwio, dtype))

        kernel = self.param("kernel", init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, low_kernel, low_bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        strides, dilation = _pair(self.strides), _pair(self.kernel_dilation)
        padding = canonicalize_padding(self.padding, 2)

        def conv(x, kernel):
            return conv_nhwc(x, kernel, layout, strides, padding, dilation, self.precision)

        def with_bias(conv_fn):
            def fn(x, kernel, bias):
                y = conv_fn(x, kernel)
                if bias is not None:
                    y += bias.reshape((1, 1, 1, -1))
                return y
            return fn

        plain = with_bias(conv)

        def apply(x, kernel, bias):
            pad = (tensor_core_channels(x.shape[-1], self.features)
                   if x.dtype.itemsize == 2 and platform_forms.channel_padding() else None)
            cpu = plain
            if degenerate_on_cpu(x.shape[1:3], (kh, kw), strides, padding, dilation):
                cpu = with_bias(lambda x, kernel: conv_taps(x, kernel, layout, strides, padding, self.precision))
            if pad is None and cpu is plain:
                return plain(x, kernel, bias)
            gpu = plain if pad is None else functools.partial(conv_padded_channels, conv, layout=layout,
                                                              pin=pad[0], pout=pad[1])
            return platform_forms.choose(x, kernel, bias, cpu=cpu, default=plain, gpu=gpu)

        mesh = platform_forms.data_mesh()
        if mesh is not None and low_kernel.dtype != kernel.dtype:
            # a batch sharded over devices, weights cast down: the devices' weight gradients
            # are summed in float32, not in the compute dtype (models/grad_sum.py)
            return grad_sum.apply_summing_grads_in_float32(
                lambda x, p: apply(x, *p), mesh, x, (kernel, bias))
        return apply(x, low_kernel, low_bias)
