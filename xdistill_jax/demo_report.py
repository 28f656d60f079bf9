"""The demo's report: the results table, W/report.md and PNG figures drawn with PIL only.

Figures (W/figures/):
  curves.png        training curves of both runs from their metrics.jsonl: photometric loss
                    (both) and the distillation loss (X-Distill), against the step.
  predictions.png   a few test frames: input | GT depth (the world's dense rendered depth, the
                    velodyne GT is too sparse to look at) | baseline | X-Distill disparity.
  segmentation.png  the same frames: input | teacher groups | translator groups (X-Distill),
                    one fixed colour per group (PALETTES; Cityscapes colours).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from xdistill_jax import semantics

EIGEN_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
# Monodepth2's Make3D table columns; its "log10" is the RMS of the log10 differences (the authors'
# script), not the mean |log10 difference| of older tables (eval JSON key `log10_abs`).
MAKE3D_KEYS = ("abs_rel", "sq_rel", "rmse", "log10")
NUM_FRAMES = 4
RUN_COLOURS = {"baseline": (31, 119, 180), "xdistill": (214, 39, 40), "xdistill_distill": (255, 127, 14)}

# Cityscapes colours of the 19 trainIds; a group is drawn in the colour of its first member class.
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))


def group_palette(grouping: str) -> np.ndarray:
    """(G,3) uint8: each group in the Cityscapes colour of its first member class."""
    g = semantics.get_grouping(grouping)
    out = np.zeros((g.num_groups, 3), np.uint8)
    for gid in range(g.num_groups):
        first = g.class_to_group.index(gid)
        out[gid] = CITYSCAPES_COLOURS[first]
    return out


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """Two markdown tables (synthetic Eigen test split, Make3D) of {run: {split: metrics}}."""
    from xdistill_jax.demo import EIGEN_SPLIT, MAKE3D_SPLIT, RUN_TITLES

    lines = []
    for split, keys, title in ((EIGEN_SPLIT, EIGEN_KEYS, "Synthetic Eigen-style test split (velodyne GT, "
                                "Garg crop, median scaling, cap 80 m)"),
                               (MAKE3D_SPLIT, MAKE3D_KEYS, "Synthetic Make3D (central 21 grid rows, "
                                "depth < 70 m, median scaling; log10 = RMS of log10 differences, "
                                "Monodepth2's column)")):
        n = next(iter(results.values()))[split]["num_images"]
        lines += [f"{title}, {n} images:", "",
                  "| method | " + " | ".join(f"{k:>8s}" for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for run in ("constant", "baseline", "xdistill"):
            if run in results:
                m = results[run][split]
                lines.append(f"| {RUN_TITLES[run]:30s} | " + " | ".join(f"{m[k]:8.4f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- drawing


def _text(draw, xy, text, fill=(0, 0, 0)):
    draw.text(xy, text, fill=fill)


def line_plot(series: dict[str, tuple[np.ndarray, np.ndarray, tuple]], title: str,
              size: tuple[int, int] = (640, 360)):
    """A PIL image of y-against-x lines: series {label: (x, y, rgb)}, linear axes, legend."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    xs = np.concatenate([s[0] for s in series.values()]) if series else np.zeros(1)
    ys = np.concatenate([s[1] for s in series.values()]) if series else np.zeros(1)
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    y0, y1 = float(ys.min()), float(ys.max())
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for i in range(5):  # ticks and grid
        fy = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, fy)
        draw.line([left, py, w - right, py], fill=(225, 225, 225))
        _text(draw, (4, py - 6), f"{fy:.4g}")
        fx = x0 + (x1 - x0) * i / 4
        px, _ = to_px(fx, y0)
        _text(draw, (px - 10, h - bottom + 4), f"{fx:.0f}")
    _text(draw, (left, 8), title)
    _text(draw, ((w - left) // 2 + left - 12, h - 16), "step")
    for k, (label, (x, y, colour)) in enumerate(series.items()):
        pts = [to_px(float(a), float(b)) for a, b in zip(x, y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        ly = top + 8 + 14 * k
        draw.line([w - right - 190, ly + 6, w - right - 170, ly + 6], fill=colour, width=3)
        _text(draw, (w - right - 165, ly), label)
    return img


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl (half-written last lines skipped)."""
    out = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def curves_figure(workdir: pathlib.Path):
    from PIL import Image

    photometric, distill = {}, {}
    for run in ("baseline", "xdistill"):
        recs = [r for r in read_metrics(workdir / "runs" / run / "metrics.jsonl") if r.get("split") == "train"]
        steps = np.array([r["step"] for r in recs], np.float64)
        photometric[f"{run} photometric"] = (steps, np.array([float(r["photometric_loss"]) for r in recs]),
                                             RUN_COLOURS[run])
        if run == "xdistill" and recs and "distill_loss" in recs[0]:
            distill["xdistill distillation (CE)"] = (
                steps, np.array([float(r["distill_loss"]) for r in recs]), RUN_COLOURS["xdistill_distill"])
    a = line_plot(photometric, "training photometric loss (train batches)")
    b = line_plot(distill, "X-Distill distillation loss (train batches)")
    out = Image.new("RGB", (a.width, a.height + b.height), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (0, a.height))
    return out


def _labelled_grid(rows: list[list[np.ndarray]], headers: list[str]):
    """Images (H,W,3) uint8 in a grid with a header row of column titles."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    gap, head = 4, 16
    cols = len(headers)
    out = Image.new("RGB", (cols * (w + gap) - gap, head + len(rows) * (h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for c, title in enumerate(headers):
        _text(draw, (c * (w + gap) + 2, 2), title)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out.paste(Image.fromarray(np.ascontiguousarray(tile)), (c * (w + gap), head + r * (h + gap)))
    return out


def _resize(img: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.NEAREST if nearest else Image.BILINEAR))


def _save_png(image, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def frame_figures(workdir: pathlib.Path, size, configs: dict):
    """(predictions figure, segmentation figure) for NUM_FRAMES evenly spaced test frames."""
    from PIL import Image

    from data_pipelines.kitti import raw
    from data_pipelines.teacher.train_teacher import FlaxBackend
    from xdistill_jax import demo_eval
    from xdistill_jax.inference import load_resized
    from xdistill_jax.metric_writer import colormap

    world = workdir / "world"
    cfg = configs["baseline"]
    height, width = cfg.data.height, cfg.data.width
    lines = raw.read_split_file(world / "splits" / "test_files.txt")
    picks = np.linspace(0, len(lines) - 1, NUM_FRAMES).round().astype(int)
    images = np.stack([load_resized(raw.image_path(world, lines[i]), height, width)[0] for i in picks])
    preds = {run: demo_eval.predict_frames(workdir / "runs" / run, configs[run], images)
             for run in ("baseline", "xdistill")}
    pred_rows, seg_rows = [], []
    palette = group_palette(size.grouping)
    teacher = FlaxBackend(workdir / "teacher")
    teacher_groups = np.argmax(semantics.group_logits_np(teacher.class_logits(images, []), size.grouping), -1)
    for k, i in enumerate(picks):
        line = lines[i]
        dense = world / line.folder / f"depth_0{line.camera}" / "data" / f"{line.frame_index:010d}.png"
        with Image.open(dense) as im:
            depth = np.asarray(im, np.float32) / 256.0
        gt_disp = np.where(depth > 0, 1.0 / np.maximum(depth, 1e-3), 0.0)
        gt_img = _resize(colormap(gt_disp), height, width)
        row = [images[k], gt_img]
        for run in ("baseline", "xdistill"):
            row.append(colormap(preds[run][0][k]))
        pred_rows.append(row)
        tr = preds["xdistill"][1][k]
        seg_rows.append([images[k], _resize(palette[teacher_groups[k]], height, width, nearest=True),
                         _resize(palette[tr], height, width, nearest=True)])
    pred_fig = _labelled_grid(pred_rows, ["input", "GT depth (dense)", "Monodepth2", "X-Distill"])
    seg_fig = _labelled_grid(seg_rows, ["input", "teacher groups", "translator groups"])
    return pred_fig, seg_fig


def _warmup_text(distill) -> str:
    if not (distill.depth_grad_start or distill.depth_grad_ramp):
        return ""
    # the log's steps, counted from 1: the factor is 0 up to step `depth_grad_start` of that count
    return (f"; its gradient reaches the depth net from step {distill.depth_grad_start + 1}, ramped to full "
            f"over {distill.depth_grad_ramp} steps (the translator learns from step 0; the two runs' "
            "photometric curves part before that all the same, at rounding level first: X-Distill's step "
            "is another compiled program, whose float additions XLA orders otherwise)")


def _lr_text(cfg) -> str:
    """The learning rate and its drops within the run, as the training log's first line says it
    (the quick demo keeps the epoch drop: x0.1 from step 113 of 120)."""
    from data_pipelines.kitti import tfds_builder
    from xdistill_jax import train

    num_examples = len(tfds_builder.open_split(cfg.data.dataset_dir, cfg.data.train_split))
    return train.describe_lr_schedule(cfg, train.epoch_steps(cfg, num_examples))


def write_report(workdir, size, configs: dict, results: dict, table: str, stages) -> pathlib.Path:
    """Draws the figures and writes W/report.md (report.md last: its presence marks completion)."""
    workdir = pathlib.Path(workdir)
    steps = configs["baseline"].optim.num_steps
    figures = workdir / "figures"
    _save_png(curves_figure(workdir), figures / "curves.png")
    pred_fig, seg_fig = frame_figures(workdir, size, configs)
    _save_png(pred_fig, figures / "predictions.png")
    _save_png(seg_fig, figures / "segmentation.png")
    g = semantics.get_grouping(size.grouping)
    palette = group_palette(size.grouping)
    legend = ", ".join(f"{name} rgb{tuple(int(v) for v in palette[i])}" for i, name in enumerate(g.group_names))
    cfg = configs["xdistill"]
    lr_text = _lr_text(cfg)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in stages.seconds.items())
    text = f"""# xdistill demo ({size.name})

World: {size.drives} drives x {size.frames} frames rendered at {size.world_width}x{size.world_height} (WxH)
(the last drive is the test split), {size.make3d_images} Make3D-layout images; seed {size.seed}.
Teacher: {size.teacher_variant}, {size.teacher_steps} steps on the world's labels, {size.grouping} grouping.
Both runs: ResNet-18 from scratch, {cfg.data.height}x{cfg.data.width} (HxW), batch {cfg.optim.batch_size},
{steps} steps, {lr_text}, seed {cfg.run.seed}; X-Distill adds lambda = {cfg.distill.weight}
({cfg.distill.mode}){_warmup_text(cfg.distill)}. Configs: runs/baseline/config.json, runs/xdistill/config.json.

{table}
Stage wall times of the invocation that wrote this report: {timing or "all stages resumed"}.

## Figures

Training curves: ![curves](figures/curves.png)

Test frames (disparity colour-mapped per image): ![predictions](figures/predictions.png)

Teacher vs translator groups ({legend}): ![segmentation](figures/segmentation.png)
"""
    path = workdir / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
