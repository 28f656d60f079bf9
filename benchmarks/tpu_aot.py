"""The train step compiled for a TPU slice that is not here (deviceless AOT): memory, FLOPs, collectives.

    pip install "libtpu==<the version jax[tpu] names for the installed jax>"   # no TPU needed
    python benchmarks/tpu_aot.py --topology v5e:2x2 --config.optim.batch_size=12

libtpu compiles for a TPU topology on any host (`jax.experimental.topologies`; v4, v5e, v5p,
v6e; "v5e:2x2" is 4 chips). The batch is sharded over all of the topology's chips, the state
replicated, as `xdistill train` runs on a pod slice (DESIGN.md); give the global batch. Per
variant (compute dtype x distillation on/off) this prints, for one chip's program:

  * compile seconds on this host (a TPU VM has more cores);
  * device memory by XLA's buffer assignment: arguments + temporaries + outputs not aliased to
    donated arguments;
  * XLA's cost analysis of the compiled program: FLOPs (convolutions included, unlike the GPU's
    compile-only client) and "bytes accessed", XLA's own estimate (it counts what each
    operation's tiled layout touches; not a measured traffic);
  * libtpu's own estimate of the step's time (`hlo_census.estimated_cycles`: the cycles its
    compiler's cost model writes on each instruction, summed by scope; ms at `--clock-ghz`, 1.5
    for a v5e, whose 197 bf16 TFLOP/s are 4 MXUs of 128 x 128 at 1.5 GHz): a model's figure, not
    every instruction carries one (those that do not are named), for comparing two versions of
    the step on the same topology;
  * the collectives per step by kind, with their elements by type (`hlo_census.collectives`,
    `collective_totals`): a data-parallel step should only all-reduce (gradients, BatchNorm
    statistics, loss means), in float32. An all-gather means every chip computed something on
    the whole batch: until 2026-12-05 the pose net and the translator did; bf16 elements meant
    the weight gradients were summed in bf16, until models/grad_sum.py (benchmarks/RESULTS.md).

Nothing runs on a TPU: only a run on one measures time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_aot import _comma_list  # noqa: E402


def measure(config, mesh, seed: int = 0) -> dict:
    from xdistill_jax import benchmark, hlo_census

    _, compiled, lower_s, compile_s = benchmark.compile_step(config, mesh, seed)
    mem = compiled.memory_analysis()
    flops, accessed = benchmark._cost(compiled)
    return {
        "estimate": hlo_census.estimated_cycles(compiled.as_text()),
        "lower_s": lower_s, "compile_s": compile_s,
        "memory_bytes": benchmark._xla_memory_bytes(compiled),
        "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "flops": math.nan if flops is None else flops,
        "bytes_accessed": math.nan if accessed is None else accessed,
        "collectives": hlo_census.collective_totals(hlo_census.collectives(compiled.as_text())),
    }


def table(rows: list[dict], device: str, chips: int) -> str:
    from xdistill_jax import hlo_census

    out = [f"Train step compiled for {chips} x {device} on this host (deviceless; nothing ran on a TPU); "
           "figures per chip, batch global", "",
           "| variant | batch | HxW | compile s | memory GB (XLA) | GFLOP/step | GB accessed (XLA est.) | collectives |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        coll = hlo_census.describe_collectives(r["collectives"])
        out.append(f"| {r['variant']} | {r['batch']} | {r['hw']} | {r['compile_s']:.1f} | "
                   f"{r['memory_bytes'] / 1e9:.2f} | {r['flops'] / 1e9:.0f} | {r['bytes_accessed'] / 1e9:.0f} | {coll} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/kitti_resnet18_640x192.py")
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2, v4:2x2x1, v6e:2x2")
    p.add_argument("--dtypes", default="bfloat16", type=_comma_list(("bfloat16", "float32")),
                   help="comma list of bfloat16,float32")
    p.add_argument("--distill", default="on", type=_comma_list(("on", "off")), help="comma list of on,off")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock-ghz", type=float, default=1.5,
                   help="TPU clock for libtpu's estimated cycles in ms (1.5: a v5e)")
    args, overrides = p.parse_known_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from jax.experimental import topologies

    import xdistill_jax
    from xdistill_jax import benchmark, config_utils, hlo_census

    try:
        topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as e:  # no libtpu, or a name it does not know
        raise SystemExit(f"tpu_aot: no TPU topology {args.topology!r} ({type(e).__name__}: {e}); "
                         f"install the libtpu that jax[tpu]=={jax.__version__} names") from e
    chips = len(topology.devices)
    mesh = topologies.make_mesh(topology, (chips,), ("data",))
    base = config_utils.config_from_args(args.config, overrides + [f"--config.mesh.num_devices={chips}"])
    rows = []
    t0 = time.perf_counter()
    for variant in benchmark.variants(args.dtypes, [x == "on" for x in args.distill]):
        config = benchmark.variant_config(base, variant)
        row = {"variant": variant.name, "batch": config.optim.batch_size,
               "hw": f"{config.data.height}x{config.data.width}"}
        row.update(measure(config, mesh, seed=args.seed))
        rows.append(row)
        print(f"{variant.name}: compile {row['compile_s']:.1f} s, memory {row['memory_bytes'] / 1e9:.2f} GB per chip, "
              f"{row['flops'] / 1e9:.0f} GFLOP per chip-step, collectives {hlo_census.describe_collectives(row['collectives'])}", flush=True)
    device = topology.devices[0].device_kind
    print()
    print(f"{xdistill_jax.__file__}, jax {jax.__version__}, {args.topology}, {args.config} {' '.join(overrides)} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(table(rows, device, chips))
    for r in rows:
        print(f"\n{r['variant']}, one chip's step: " + hlo_census.cycles_markdown(r["estimate"], args.clock_ghz * 1e9))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "device": device, "chips": chips, "config": args.config,
                       "overrides": overrides, "jax": jax.__version__,
                       "results": rows},
                      f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
