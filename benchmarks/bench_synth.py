"""Time the synthetic world generation (default: the demo world) and print wall/CPU seconds and size.

    python benchmarks/bench_synth.py [--out DIR] [--workers N] [--width W --height H --frames F]

CPU seconds include the worker processes (RUSAGE_CHILDREN), so wall time on a machine with
free cores is about CPU / workers; on a busy machine the wall time is what others leave you.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from data_pipelines.synthetic_world.generate import DEMO, generate_world


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one, removed)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--width", type=int, default=DEMO["width"])
    parser.add_argument("--height", type=int, default=DEMO["height"])
    parser.add_argument("--frames", type=int, default=DEMO["frames"])
    args = parser.parse_args()
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "world"
    config = dict(DEMO, width=args.width, height=args.height, frames=args.frames)

    def cpu():
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    wall, cpu0 = time.time(), cpu()
    generate_world(base, seed=0, workers=args.workers, overwrite=True, **config)
    wall, used = time.time() - wall, cpu() - cpu0
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    frames = config["drives"] * config["frames"]
    print(f"world {config['drives']}x{config['frames']} frames at {config['width']}x{config['height']}, "
          f"{config['make3d_images']} Make3D images: wall {wall:.1f} s, CPU {used:.1f} s "
          f"({used / frames * 1000:.0f} ms CPU per frame incl. scans and Make3D), {size / 1e6:.0f} MB on disk")
    if not args.out:
        shutil.rmtree(base.parent)


if __name__ == "__main__":
    main()
