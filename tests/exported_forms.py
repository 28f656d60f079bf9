"""What a function lowers to for each platform, without the platform's device: StableHLO
exported by `jax.export` for cpu, cuda and tpu (for the forms chosen by
`xdistill_jax.platform_forms.choose`, which outside a train step's trace leaves the choice to
`jax.lax.platform_dependent` at lowering; no test functions here)."""

import jax
from jax import export

PLATFORMS = ("cpu", "cuda", "tpu")


def stablehlo_by_platform(fn, *specs) -> dict[str, str]:
    """{platform: StableHLO text of jit(fn) lowered for it} for argument specs `specs`."""
    return {p: export.export(jax.jit(fn), platforms=[p])(*specs).mlir_module() for p in PLATFORMS}
