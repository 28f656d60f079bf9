"""A 2-D convolution whose kernel can be stored OHWI: the layout cuDNN computes it in.

`flax.linen.Conv` stores its kernel HWIO (row-major). On a GPU, XLA runs the NHWC convolutions
through cuDNN with the filter in OHWI order (bf16 and, on the H100 target, fp32 too), and cuDNN's filter gradient comes out OHWI. With
HWIO weights every trained convolution then pays, per step, a transposing Adam update that cannot
update in place and a copy of each of the new weight, mu and nu into the donated buffers
(benchmarks/RESULTS.md, "Where the other scope goes"). Stored OHWI they are plain in-place
elementwise updates.

`Conv` is `flax.linen.Conv` (2-D, shared weights, no feature groups) with a `kernel_layout`:
"OHWI" or "HWIO" (flax's, hence checkpoints written before the layout existed:
`config_defaults.LEGACY_KERNEL_LAYOUT`). The kernel is drawn by `kernel_init` in HWIO and transposed, so
both layouts hold the same numbers for the same key; the convolution is the same
`lax.conv_general_dilated` with the kernel's dimension numbers, so the two compute the same
function. They round alike, not always bitwise alike: XLA lays out and fuses the two programs
differently (on the CPU the first train step is bitwise the same, later ones differ at rounding
level; tests/test_train_step.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding

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
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        y = jax.lax.conv_general_dilated(
            inputs, kernel, _pair(self.strides), canonicalize_padding(self.padding, 2),
            rhs_dilation=_pair(self.kernel_dilation),
            dimension_numbers=("NHWC", layout, "NHWC"), precision=self.precision,
        )
        if bias is not None:
            y += bias.reshape((1, 1, 1, -1))
        return y
