"""The train step compiled for a GPU that is not here (deviceless AOT): kernels, bytes, memory.

    pip install "jax-cuda13-plugin==$JAXVER" "jax-cuda13-pjrt==$JAXVER"   # JAXVER: installed jax's
    python benchmarks/gpu_aot.py --config configs/kitti_resnet18_640x192.py --json aot.json

XLA's GPU compiler runs on the host: given a description of the target (`--target h100|h200`, the
texts `H100_SXM` and `H200_SXM` below; or `--target-config`, a `stream_executor.GpuTargetConfigProto`
text file; default: the H100, the issue's device) it compiles the full
X-Distill train step for that GPU without one being present. Per variant (compute dtype x
distillation on/off) this prints what the compiled program is, not how fast it runs:

  * lower / compile seconds on this host (no autotuning: there is no device to time kernels on;
    a GPU host compiles with more cores and autotunes, so its cold start differs), and the
    compile seconds of the train state's init as `create_train_state` lowers it (the other part
    of a cold start's compiling);
  * device memory by XLA's buffer assignment: arguments + temporaries + outputs not aliased to
    donated arguments (the runtime adds its allocator's slack and library handles);
  * kernels: fusions, cuDNN / cuBLAS calls, copies (`xdistill_jax.hlo_census`), and the
    distinct cuDNN / cuBLAS configurations among the calls: what a GPU's cold compile autotunes,
    one configuration at a time;
  * bytes moved per step (an estimate, see hlo_census) and the memory roofline: bytes /
    bandwidth of the target, a lower bound on the step time of a memory-bound step, and the
    images/s it would allow (XLA's cost analysis, hence FLOPs, is not available from the
    compile-only client; `xdistill bench` reports FLOPs where the step runs);
  * with `--devices N` (N GPUs of the target, the batch sharded over them; give the global
    batch, e.g. `--config.optim.batch_size=48` for 12 per GPU): the figures are one GPU's, and
    its collectives are counted by kind, with their elements by type (`hlo_census.collectives`).
    A data-parallel step should only all-reduce, in float32: an all-gather means every GPU
    computes something on the whole batch, bf16 elements that gradients are summed in bf16.

Only a run on the device measures time (benchmarks/gpu.sh). The CUDA plugin is needed, not a GPU,
a driver or cuDNN: `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` (set here) skips the plugin's check for the
CUDA libraries; ptxas must be on PATH (CUDA toolkit) or in the pip nvidia-cuda-nvcc wheel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

# NVIDIA H100 SXM5 80GB (compute capability 9.0): 132 SMs, 50 MiB L2, 3.35 TB/s HBM3, 1.98 GHz
# boost clock; per SM 228 KiB shared memory (227 KiB opt-in per block), 64 Ki registers, 2048
# threads. The CUDA runtime and cuDNN versions are the plugin's (CUDA 13, cuDNN 9).
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _retarget(text: str, **fields: str) -> str:
    """`text` with each top-level `field: value` line of a target description replaced (once each)."""
    for key, value in fields.items():
        text, n = re.subn(rf"^(\s*{key}:\s*).*$", lambda m: m.group(1) + value, text, flags=re.M)
        if n != 1:
            raise ValueError(f"target description: {n} lines for {key!r}, expected 1")
    return text


# NVIDIA H200 SXM 141GB: the H100's GH100 chip (132 SMs, the same clocks and caches) with HBM3e at
# 4.8 TB/s and 143,771 MiB; the GPU this project's sessions may be lent (benchmarks/gpu.sh), so its
# census can be read beside a measured run (benchmarks/gpu_targets.py bounds the H100's from it).
H200_SXM = _retarget(H100_SXM, memory_bandwidth="4800000000000", device_memory_size="150754820096",
                     device_description_str='"NVIDIA H200"')
TARGETS = {"h100": H100_SXM, "h200": H200_SXM}


def target_facts(target_config: str) -> dict:
    """(device name, memory bandwidth in bytes/s) of a target config text."""
    name = re.search(r'device_description_str:\s*"([^"]*)"', target_config)
    bandwidth = re.search(r"memory_bandwidth:\s*([0-9]+)", target_config)
    if name is None or bandwidth is None:
        raise ValueError("target config must give device_description_str and memory_bandwidth")
    return {"device": name.group(1), "bandwidth": float(bandwidth.group(1))}


def measure(config, mesh, facts: dict, *, seed: int = 0, hlo_path: str | None = None,
            state_layout: str = "default") -> dict:
    from xdistill_jax import benchmark, hlo_census

    _, compiled, lower_s, compile_s = benchmark.compile_step(config, mesh, seed, state_layout=state_layout)
    _, init_compile_s, _ = benchmark.compile_init(config, mesh, seed)
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    mem = compiled.memory_analysis()
    kernels = hlo_census.kernels(text)
    summary = hlo_census.summarize(kernels, bandwidth=facts["bandwidth"])
    batch = config.optim.batch_size
    return {
        "lower_s": lower_s, "compile_s": compile_s,
        "init_compile_s": init_compile_s,
        "memory_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                            + mem.output_size_in_bytes - mem.alias_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "kernels": summary["kernels"],
        # XLA's own dot fusions are fusions; cuDNN/cuBLAS calls are hlo_census's library calls
        "fusions": sum(1 for k in kernels if k["opcode"] == "fusion"),
        "library_calls": summary["library_calls"],
        "library_configs": summary["library_configs"],
        "copies": sum(1 for k in kernels if k["kind"] == "copy/transpose"),
        "wide_convolutions": len(summary["wide_convolutions"]),
        "unaligned_convolutions": len(summary["unaligned_convolutions"]),
        "small_kernels": sum(summary["small_kernels"].values()),
        "bytes": summary["bytes"], "roofline_ms": summary["roofline_ms"],
        "roofline_images_per_s": batch / (summary["roofline_ms"] / 1e3),  # the devices in parallel
        "collectives": hlo_census.collective_totals(hlo_census.collectives(text)),
        "census": summary,
    }


def table(rows: list[dict], facts: dict) -> str:
    devices = rows[0].get("devices", 1) if rows else 1
    per = f", {devices} of them, figures per GPU, batch global" if devices > 1 else ""
    out = [f"Train step compiled for {facts['device']}{per} on this host (deviceless; nothing ran on a GPU)", "",
           "| variant | batch | HxW | compile s | init compile s | memory GB (XLA) | kernels | fusions | cuDNN/cuBLAS "
           "| copies | GB moved/step (est.) | memory roofline ms | images/s at roofline |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['batch']} | {r['hw']} | {r['compile_s']:.1f} | {r['init_compile_s']:.1f} "
                   f"| {r['memory_bytes'] / 1e9:.2f} "
                   f"| {r['kernels']} | {r['fusions']} | {r['library_calls']} | {r['copies']} | {r['bytes'] / 1e9:.2f} "
                   f"| {r['roofline_ms']:.2f} | {r['roofline_images_per_s']:.0f} |")
    return "\n".join(out)


def _comma_list(allowed: tuple[str, ...]):
    """argparse type: a comma list of `allowed` (anything else: an error naming the flag)."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in allowed for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


def main() -> None:
    from xdistill_jax import config_defaults  # ml_collections only: the flags fail before jax loads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/kitti_resnet18_640x192.py")
    p.add_argument("--dtypes", default="bfloat16,float32", type=_comma_list(("bfloat16", "float32")),
                   help="comma list of bfloat16,float32")
    p.add_argument("--distill", default="on,off", type=_comma_list(("on", "off")), help="comma list of on,off")
    p.add_argument("--target", choices=sorted(TARGETS), default="h100", help="built-in target description")
    p.add_argument("--target-config", default=None, help="GpuTargetConfigProto text file (instead of --target)")
    p.add_argument("--scopes", action="store_true", help="also print each variant's census by scope and kind")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--hlo-dir", default=None, help="write each variant's optimised HLO text here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1, help="GPUs of the target the batch is sharded over")
    p.add_argument("--state-layout", choices=config_defaults.STATE_LAYOUTS, default="default",
                   help="auto: the train state's layouts chosen by XLA (train.make_train_step)")
    args, overrides = p.parse_known_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from jax.experimental import topologies

    import xdistill_jax
    from xdistill_jax import benchmark, config_utils, hlo_census

    target = open(args.target_config).read() if args.target_config else TARGETS[args.target]
    facts = target_facts(target)
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=target,
                                                topology=f"1x1x{args.devices}")
    except NotImplementedError as e:
        raise SystemExit(f"gpu_aot: no CUDA compiler in this jax ({e}); install jax-cuda13-plugin and "
                         f"jax-cuda13-pjrt of jax's version ({jax.__version__})") from e
    mesh = topologies.make_mesh(topology, (args.devices,), ("data",))
    base = config_utils.config_from_args(args.config, overrides + [f"--config.mesh.num_devices={args.devices}"])
    chosen = benchmark.variants(args.dtypes, [x == "on" for x in args.distill])
    rows = []
    for variant in chosen:
        config = benchmark.variant_config(base, variant)
        name = dataclasses.replace(variant, state_layout=args.state_layout).name
        row = {"variant": name, "batch": config.optim.batch_size, "devices": args.devices,
               "hw": f"{config.data.height}x{config.data.width}"}
        hlo_path = None
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            hlo_path = os.path.join(args.hlo_dir, re.sub(r"\W+", "_", name) + ".hlo.txt")
        row.update(measure(config, mesh, facts, seed=args.seed, hlo_path=hlo_path,
                           state_layout=args.state_layout))
        rows.append(row)
        print(f"{name}: compile {row['compile_s']:.1f} s (init {row['init_compile_s']:.1f} s), "
              f"{row['kernels']} kernels ({row['small_kernels']} moving < "
              f"{hlo_census.SMALL_KERNEL_BYTES / 1e6:g} MB each), "
              f"{row['library_configs']} distinct cuDNN/cuBLAS configurations to autotune, "
              f"{row['bytes'] / 1e9:.2f} GB moved/step (est.), memory {row['memory_bytes'] / 1e9:.2f} GB, "
              f"{row['wide_convolutions']} wide convolutions (hlo_census: slow on the device, cheap in bytes), "
              f"{row['unaligned_convolutions']} unaligned 16-bit convolutions"
              + (f"; collectives per step: {hlo_census.describe_collectives(row['collectives'])}"
                 if args.devices > 1 else "")
              + "".join(f"; {k['name']} ({k['scope']}, {k['pass']}) {'x'.join(map(str, k['window']))}"
                        for k in row["census"]["wide_convolutions"]), flush=True)
        if args.scopes:
            print(hlo_census.markdown(row["census"]), "\n", flush=True)
    print()
    print(f"{xdistill_jax.__file__}, jax {jax.__version__}, {args.config} {' '.join(overrides)}")
    print(table(rows, facts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": facts, "config": args.config, "overrides": overrides,
                       "jax": jax.__version__, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
