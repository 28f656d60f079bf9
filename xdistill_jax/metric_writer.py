"""Training metrics: JSON lines (`metrics.jsonl`), TensorBoard event files, and PNG images.

Only process 0 writes; other processes get a writer whose methods do nothing, so the loop calls
it unconditionally. tensorboardX is imported lazily and is optional (missing -> JSON only).
Each `metrics.jsonl` line is `{"step": int, "split": "train"|"val", key: float, ...}`; a resumed
run first drops lines with a step beyond the checkpoint it resumed from, so the file has no
duplicated steps after a restart.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> set[tuple[int, str]]:
        """Drop lines whose step > `step` (work after the checkpoint we resume from is redone).

        Returns the (step, split) pairs of the lines kept (on process 0; empty elsewhere).
        """
        if not self.enabled or not self.path.exists():
            return set()
        keep, kept = [], set()
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                if record["step"] <= step:
                    keep.append(line)
                    kept.add((int(record["step"]), str(record.get("split", "train"))))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line from a killed run
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(s + "\n" for s in keep))
        os.replace(tmp, self.path)
        return kept

    def write_scalars(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        for k, v in scalars.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def write_image(self, step: int, name: str, image: np.ndarray) -> pathlib.Path | None:
        """Save an (H,W) or (H,W,3) image in [0,1] or uint8 to `images/<name>_step<N>.png`."""
        if not self.enabled:
            return None
        from PIL import Image
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        path = self.workdir / "images" / f"{name}_step{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.png")
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
        if self._tb is not None:
            self._tb.add_image(name, arr if arr.ndim == 3 else arr[..., None], int(step), dataformats="HWC")
        return path

    def flush(self):
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def colormap(disp: np.ndarray) -> np.ndarray:
    """(H,W) disparity -> (H,W,3) uint8, normalised to its 95th percentile (Monodepth2's display)."""
    disp = np.asarray(disp, np.float32)
    vmax = float(np.percentile(disp, 95)) or 1.0
    x = np.clip(disp / vmax, 0.0, 1.0)
    # a dependency-free magma-like ramp: black -> purple -> orange -> yellow-white
    r = np.clip(1.6 * x, 0, 1)
    g = np.clip(1.8 * x - 0.6, 0, 1)
    b = np.clip(np.where(x < 0.5, 1.2 * x, 1.6 - 1.6 * x + 0.2), 0, 1)
    return (np.stack([r, g, b], -1) * 255 + 0.5).astype(np.uint8)


def label_image(labels: np.ndarray, num_groups: int) -> np.ndarray:
    """(H,W) int group ids -> (H,W,3) uint8 with a fixed palette (255 = black)."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, size=(max(num_groups, 1), 3)).astype(np.uint8)
    out = np.zeros(labels.shape + (3,), np.uint8)
    valid = (labels >= 0) & (labels < num_groups)
    out[valid] = palette[labels[valid]]
    return out
