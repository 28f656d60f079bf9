"""The demo's evaluation stage: both trained runs and a constant-depth predictor, two protocols.

The protocols are `xdistill eval`'s (`xdistill_jax.eval_depth`): the Eigen protocol on the
synthetic test split (the held-out drive, every frame; velodyne GT exported by `export-gt`, Garg
crop, per-image median scaling, 80 m cap) and the Make3D protocol on W/world/make3d (2:1 image
crop, central 21 laser rows, 70 m cap, median scaling, + log10 (Monodepth2's Make3D column, the
RMS of log10 differences) and log10_abs (mean |log10 difference|)).

The constant predictor (disparity 1 everywhere) is the sanity row: after median scaling it
predicts every pixel at the image's median GT depth. It is scored by the same per-image
functions (`score_kitti_image`, `score_make3d_image`).

Outputs (`eval_depth.write_result`: JSON + per-image CSV, atomic): W/runs/<run>/eval/<split>-step<N>
with the seven metric keys (+ log10 and log10_abs for Make3D) and num_images; W/eval/constant-<split>.

`predict_frames` (the report's figures) runs a run's depth net and, for X-Distill, its
translator on a few images.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import numpy as np

from xdistill_jax import evaluation

PREDICT_BATCH = 8


def result_paths(workdir, steps: int) -> dict[tuple[str, str], pathlib.Path]:
    """{(run, split): json path} for the runs, the constant predictor and both splits."""
    from xdistill_jax.demo import EIGEN_SPLIT, MAKE3D_SPLIT, RUNS

    workdir = pathlib.Path(workdir)
    out = {}
    for split in (EIGEN_SPLIT, MAKE3D_SPLIT):
        out[("constant", split)] = workdir / "eval" / f"constant-{split}.json"
        for run in RUNS:
            out[(run, split)] = workdir / "runs" / run / "eval" / f"{split}-step{steps}.json"
    return out


def load_results(paths: dict) -> dict[str, dict[str, dict]]:
    """{run: {split: metrics}} from `result_paths`."""
    out: dict[str, dict[str, dict]] = {}
    for (run, split), path in paths.items():
        out.setdefault(run, {})[split] = json.loads(path.read_text())
    return out


def load_run(run_dir, config):
    """(Networks, params, batch_stats) of the latest checkpoint of a training run (all nets,
    the translator included, which `inference.load_workdir_model` leaves out)."""
    from xdistill_jax import train
    from xdistill_jax.checkpoints import Checkpointer
    from xdistill_jax.objective import Networks

    nets = Networks.from_config(config)
    mesh = train.make_mesh(config)
    abstract, _ = train.abstract_train_state(nets, train.make_optimizer(config, 1), mesh)
    ckpt = Checkpointer(pathlib.Path(run_dir) / "checkpoints", keep=1, async_save=False)
    try:
        state, _, _ = ckpt.restore(abstract)
    finally:
        ckpt.close()
    if state is None:
        raise ValueError(f"{run_dir}/checkpoints: no checkpoint to evaluate")
    return nets, state.params, state.batch_stats


def predict_frames(run_dir, config, images: np.ndarray):
    """Scaled disparity (N,H,W) float32 and the translator's group argmax (N,h,w) uint8 (None
    without distillation) of uint8 images (N,H,W,3) at the training size."""
    import jax
    import jax.numpy as jnp

    from xdistill_jax import geometry

    nets, params, batch_stats = load_run(run_dir, config)
    lo, hi = config.loss.min_depth, config.loss.max_depth

    @jax.jit
    def fn(params, batch_stats, x):
        variables = {"params": params["depth"], "batch_stats": batch_stats["depth"]}
        disps = nets.depth.apply(variables, x.astype(jnp.float32) / 255.0, train=False)
        disps = {s: d.astype(jnp.float32) for s, d in disps.items()}
        scaled, _ = geometry.disp_to_depth(disps[0], lo, hi)
        if nets.translator is None:
            return scaled[..., 0], None
        from xdistill_jax.models.translator import translate

        logits = translate(params["translator"], disps, module=nets.translator)
        return scaled[..., 0], jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    disp, labels = fn(params, batch_stats, jnp.asarray(images))
    return np.asarray(disp), (None if labels is None else np.asarray(labels))


def evaluate_all(workdir, configs: dict, gt_path, world, *, printer: Callable[[str], None] = print):
    """Evaluate every run of `configs` ({run: config}) and the constant predictor; write the results."""
    from data_pipelines.kitti import raw
    from data_pipelines.make3d import reader as make3d
    from xdistill_jax import eval_depth, inference
    from xdistill_jax.demo import EIGEN_SPLIT, MAKE3D_SPLIT

    workdir, world = pathlib.Path(workdir), pathlib.Path(world)
    steps = next(iter(configs.values())).optim.num_steps
    split_file = world / "splits" / "test_files.txt"
    make3d_dir = world / "make3d"
    paths = result_paths(workdir, steps)

    lines = raw.read_split_file(split_file)
    gts = eval_depth.load_matching_gt(gt_path, lines, protocol="eigen")  # bad entries fail before any model runs
    m3_items = make3d.list_test_set(make3d_dir)
    m3_gts = eval_depth.load_make3d_gts(m3_items)
    ones = np.ones((8, 8), np.float32)  # any size: resized to the GT's
    # rows named as the runs' rows (split line, Make3D image), so the CSVs join (were 0, 1, ...)
    constant = {
        EIGEN_SPLIT: eval_depth.make_result([eval_depth.score_kitti_image(g, ones, "eigen") for g in gts],
                                        [str(line) for line in lines], evaluation.METRIC_KEYS),
        MAKE3D_SPLIT: eval_depth.make_result([eval_depth.score_make3d_image(g, ones) for g in m3_gts],
                                         [item.image_path.name for item in m3_items], evaluation.MAKE3D_METRIC_KEYS),
    }
    for split, result in constant.items():
        eval_depth.write_result(paths[("constant", split)].parent, paths[("constant", split)].stem, result,
                                {"predictor": "constant disparity 1, median-scaled"})
    for run in configs:
        run_dir = workdir / "runs" / run
        model = inference.load_workdir_model(run_dir)
        results = {
            EIGEN_SPLIT: eval_depth.evaluate_kitti(model, world, split_file, gt_path, protocol="eigen",
                                                   batch_size=PREDICT_BATCH, show_progress=False),
            MAKE3D_SPLIT: eval_depth.evaluate_make3d(model, make3d_dir, batch_size=PREDICT_BATCH,
                                                     show_progress=False),
        }
        for split, result in results.items():
            path = paths[(run, split)]
            eval_depth.write_result(path.parent, path.stem, result, {"workdir": str(run_dir), "step": model.step})
            m = result.summary
            printer(f"  {run:9s} {split:16s} abs_rel {m['abs_rel']:.4f}  a1 {m['a1']:.4f}  "
                    f"({m['num_images']} images)")
