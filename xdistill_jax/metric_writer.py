"""Training metrics: JSON lines (`metrics.jsonl`), TensorBoard event files, and PNG images.

Only process 0 writes; other processes get a writer whose methods do nothing, so the loop calls
it unconditionally. tensorboardX is imported lazily and is optional (missing -> JSON only).
Each `metrics.jsonl` line is `{"step": int, "split": "train"|"val", key: float, ...}`; a resumed
run first drops lines with a step beyond the checkpoint it resumed from, so the file has no
duplicated steps after a restart. TensorBoard's event files cannot be cut: the resumed run's
file starts with a purge event at that checkpoint's step + 1, which makes TensorBoard hide the
earlier files' events from that step on (the work that is redone), and every write reaches the
file before the call returns, so a killed run's logged steps are on disk (tensorboardX's
`SummaryWriter` queued them to a thread, flushed every 120 s: they were lost).

tensorboardX's package imports torch where torch is installed, only to accept torch tensors
(`SummaryWriter`'s, not used here): 2.2 s of a run's start on this project's CPU VM (the
import of jax, flax and TFDS before it 2.5-3.2 s), at its first metric write. It is imported
with torch hidden from the importing thread (other threads import as ever) unless torch is
already loaded (`_tensorboardx`).
"""

from __future__ import annotations

import importlib.abc
import itertools
import json
import math
import os
import pathlib
import sys
import threading
import time
from typing import Mapping

import numpy as np

from xdistill_jax.colormap import colorize_disparity


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._file = None
        self._tensorboard = enabled and tensorboard  # the event file: opened by the first write
        self._purge_step = None  # a resume's: the first event written after it hides later ones
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tensorboard:
            try:
                self._tb = _Board(self.workdir / "tensorboard", purge_step)
            except ImportError:
                self._tensorboard = False

    def _board(self):
        if self._tb is None and self._tensorboard:
            self._open_tensorboard(self._purge_step)
        return self._tb

    def truncate_after(self, step: int) -> set[tuple[int, str]]:
        """Drop lines whose step > `step` (work after the checkpoint we resume from is redone);
        TensorBoard is told to hide earlier events from step + 1 on (module docstring).

        Returns the (step, split) pairs of the lines kept (on process 0; empty elsewhere).
        """
        if not self.enabled:
            return set()
        # the event file with the purge is opened by the first write: a resume that writes
        # nothing (a finished run rerun) leaves no empty event file behind (until 2026-12-07)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = int(step) + 1
        if not self.path.exists():
            return set()
        keep, kept = [], set()
        text = self.path.read_text()
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if record["step"] <= step:
                    keep.append(line)
                    kept.add((int(record["step"]), str(record.get("split", "train"))))
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line from a killed run
        if "".join(s + "\n" for s in keep) == text:  # nothing dropped: the file is left as it is
            return kept
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
        board = self._board()
        if board is not None:
            board.add_scalars(int(step), [(f"{split}/{k}", float(v)) for k, v in scalars.items()])

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
        board = self._board()
        if board is not None:
            board.add_image(int(step), name, arr if arr.ndim == 3 else arr[..., None])
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


_BOARDS = itertools.count()


class _NoTorchInThisThread(importlib.abc.MetaPathFinder):
    """While installed (first on sys.meta_path), `import torch` fails in the thread that
    installed it, as on a machine without torch; other threads (the loader's, the step's
    compile) import as ever."""

    def __init__(self):
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if (name == "torch" or name.startswith("torch.")) and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"no module named {name!r} (hidden while tensorboardX loads)", name=name)
        return None


def _tensorboardx():
    """The tensorboardX modules the event file needs, loaded without torch (module docstring):
    while tensorboardX loads, `import torch` fails in this thread (tensorboardX then takes numpy
    arrays alone), unless torch is already loaded. ImportError if tensorboardX is absent."""
    finder = None
    if "torch" not in sys.modules and "tensorboardX.summary" not in sys.modules:
        finder = _NoTorchInThisThread()
        sys.meta_path.insert(0, finder)
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
    return EventsWriter, Event, SessionLog, summary


class _Board:
    """A TensorBoard event file written and flushed in the caller's thread (tensorboardX's
    `SummaryWriter` hands events to a thread through a queue, and its flush does not wait for the
    queue: a killed run lost what was still in it). `purge_step`: the first event tells
    TensorBoard to hide the directory's earlier events from that step on, as `SummaryWriter`'s
    own `purge_step` does."""

    def __init__(self, logdir: pathlib.Path, purge_step: int | None = None):
        EventsWriter, Event, SessionLog, self._summary = _tensorboardx()
        self._event = Event
        logdir.mkdir(parents=True, exist_ok=True)
        # the file name holds the time in seconds and the host: the pid and a count keep a
        # restart within the same second (another process, or this one) from overwriting the
        # earlier file
        self._writer = EventsWriter(str(logdir / "events"), f".{os.getpid()}.{next(_BOARDS)}")
        if purge_step is not None:
            self._write([Event(step=purge_step, file_version="brain.Event:2"),
                         Event(step=purge_step, session_log=SessionLog(status=SessionLog.START))])

    def _write(self, events) -> None:
        for event in events:
            event.wall_time = time.time()
            self._writer.write_event(event)
        self._writer.flush()

    def add_scalars(self, step: int, values) -> None:
        self._write([self._event(step=step, summary=self._summary.scalar(tag, v)) for tag, v in values])

    def add_image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._write([self._event(step=step, summary=self._summary.image(tag, image, dataformats="HWC"))])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# the training's val_disp image (and the demo report's tiles): predict's colouring, test_simple's
# magma from the map's minimum to its 95th percentile (a home-made ramp from 0 until 2026-12-07)
colormap = colorize_disparity


def label_image(labels: np.ndarray, num_groups: int) -> np.ndarray:
    """(H,W) int group ids -> (H,W,3) uint8 with a fixed palette (255 = black)."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, size=(max(num_groups, 1), 3)).astype(np.uint8)
    out = np.zeros(labels.shape + (3,), np.uint8)
    valid = (labels >= 0) & (labels < num_groups)
    out[valid] = palette[labels[valid]]
    return out
