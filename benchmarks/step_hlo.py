"""Census of the compiled train step: how many convolutions, fusions and instructions XLA emits.

    python benchmarks/step_hlo.py --config configs/synthetic_demo.py --config.model.dtype=float32
    # another version of the code (e.g. an older commit checked out with `git worktree add`):
    PYTHONPATH=/tmp/old python benchmarks/step_hlo.py --config configs/synthetic_demo.py

Compiles `train.make_train_step` for the config (persistent compilation cache off, so the compile
time is a cold one) on synthetic batches and prints the lowering and compile times, the number of
lines of the StableHLO module, and, in XLA's optimised HLO, the instructions of the entry
computation, the fusions among them and the convolutions anywhere in the module. On a GPU every
entry fusion, convolution or custom call is at least one kernel launch, so the counts are the
CPU-side proxy for launch overhead; the compile time is the cold-start cost. Exactness is the
tests' business; this only counts.
"""

from __future__ import annotations

import argparse
import collections
import re


def _opcode(line: str) -> str:
    """The opcode of one HLO instruction line (`name = SHAPE opcode(operands), attrs`)."""
    from xdistill_jax.hlo_census import split_definition

    return split_definition(line.split(" = ", 1)[1])[1]


def census(hlo_text: str) -> dict[str, int]:
    """Counts in XLA's optimised HLO text: entry instructions by opcode, convolutions anywhere."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    ops = collections.Counter(_opcode(line) for line in entry.splitlines()[1:] if " = " in line)
    return {
        "entry_instructions": sum(ops.values()),
        "entry_fusions": ops["fusion"],
        "entry_custom_calls": ops["custom-call"],
        "convolutions": len(re.findall(r" convolution\(", hlo_text)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_demo.py")
    p.add_argument("--seed", type=int, default=0)
    args, overrides = p.parse_known_args()

    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    import xdistill_jax
    from xdistill_jax import benchmark, config_utils, train

    config = config_utils.config_from_args(args.config, overrides)
    b, h, w = config.optim.batch_size, config.data.height, config.data.width
    lowered, compiled, lower_s, compile_s = benchmark.compile_step(config, train.make_mesh(config), args.seed)
    counts = census(compiled.as_text())
    print(f"{xdistill_jax.__file__} on {jax.devices()[0].device_kind}, {args.config} {' '.join(overrides)} "
          f"(batch {b}, {h}x{w}, {config.model.dtype}, distill weight {config.distill.weight}): "
          f"lower {lower_s:.1f} s, compile {compile_s:.1f} s (cache off); StableHLO "
          f"{lowered.as_text().count(chr(10))} lines; optimised HLO: "
          + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
