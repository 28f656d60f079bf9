"""The validation split's ground-truth depth maps (`xdistill export-gt` files) for the
training loop's periodic depth metrics, checked against the split before training starts."""

from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from data_pipelines.damaged_store import DamagedStoreError
from xdistill_jax import config_utils


class ValGroundTruth:
    """Depth maps of the val split from `xdistill export-gt` (no pickle), indexed by split position.

    `gt[i]` is example i's (H,W) float32 depth. With `val_id(i)` (the split line of example i),
    the first access to each i checks that the map was exported for that line, so a GT file of
    another split fails naming both lines instead of scoring against the wrong frames.
    """

    def __init__(self, path: str, val_id: Callable[[int], str] | None = None):
        from data_pipelines.kitti.export_gt import load_gt_depths

        self.path = path
        self.depths, self.files = load_gt_depths(path)
        self.val_id = val_id
        self._checked: set[int] = set()

    def __len__(self):
        return len(self.depths)

    def check(self, num_examples: int) -> None:
        """Checks examples 0..num_examples-1 now (each has a map exported for its split line)
        instead of at their first validation; raises ValueError naming the file."""
        if num_examples > len(self.depths):
            raise ValueError(f"{self.path}: {len(self.depths)} depth maps, but validation scores "
                             f"{num_examples} val split examples; export the GT for config.data.val_split")
        for i in range(num_examples):
            self[i]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i >= len(self.depths):
            raise ValueError(f"{self.path}: {len(self.depths)} depth maps, but the val split has an "
                             f"example {i}; export the GT for config.data.val_split")
        if self.val_id is not None and i not in self._checked:
            want = self.val_id(i)
            if self.files[i] and self.files[i] != want:
                raise ValueError(f"{self.path}: depth map {i} is for {self.files[i]!r} but val split "
                                 f"example {i} is {want!r}; export the GT for config.data.val_split")
            self._checked.add(i)
        return self.depths[i]


def open_val_ground_truth(config: ml_collections.ConfigDict, data) -> ValGroundTruth | None:
    """`config.data.val_gt_depth` opened and checked against the val split, before anything is
    built or compiled: every example validation will score (all of the split, or the first
    `data.val_batches` x `optim.batch_size`) must have a map exported for its split line.

    data: a `training_loop.TrainingData` (make_val_iterator, val_id, num_val_examples).
    Raises config_utils.ConfigError naming config.data.val_gt_depth and the file (a missing
    file, a GT of another split, too few maps, a val_gt_depth without a val split).
    """
    path = config.data.val_gt_depth
    if not path:
        return None
    key = "config.data.val_gt_depth"
    if data.make_val_iterator is None:
        raise config_utils.ConfigError(f"{key}={path!r} but there is no validation split "
                                       "(config.data.val_split is empty)")
    try:
        gt = ValGroundTruth(path, data.val_id)
        n = len(gt) if data.num_val_examples is None else data.num_val_examples
        if config.data.val_batches > 0:
            n = min(n, config.data.val_batches * config.optim.batch_size)
        gt.check(n)
    except DamagedStoreError:  # the val split's own record, read for its id: not the GT file's fault
        raise
    except (OSError, ValueError) as e:
        raise config_utils.ConfigError(f"{key}: {e}") from e
    return gt
