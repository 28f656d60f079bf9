"""Convert a KITTI raw directory + a Monodepth2 split file into TFDS array_record shards.

    prepare_split("kitti_raw", "splits/eigen_zhou/train_files.txt", "data/tfds", "train",
                  192, 640)

writes OUT/kitti_triplets/train/1.0.0/ (see `tfds_builder` for what TFDS stores and how it is
read back without TensorFlow). One example per split line: frames -1, 0, +1 of the line's camera,
each resized to (height, width) with PIL LANCZOS and encoded as PNG or JPEG, the normalised K,
the line as id and its position as index.

Re-running with the same split file and settings finds the complete dataset and leaves it
alone; asking for different settings over an existing one is an error (delete it or choose
another OUT). The split file is parsed and every frame's file (and calibration file) looked up
before any image is encoded, so most bad input fails in seconds; TFDS builds into a temporary
directory renamed only at the end, so a failure never leaves a dataset that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import shutil
import tempfile

from data_pipelines.kitti import triplets

log = logging.getLogger(__name__)


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_split(
    raw_dir: str | pathlib.Path,
    split_file: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    split_name: str,
    height: int = 192,
    width: int = 640,
    *,
    image_format: str = "png",
    jpeg_quality: int = 92,
    intrinsics: str = "monodepth2",
    num_workers: int = 1,
    num_shards: int | None = None,
    target_scales: bool = False,
    compression: str = "zstd",
) -> pathlib.Path:
    """Builds (or finds complete) the triplet dataset of one split; returns its directory.

    Args:
      raw_dir: KITTI raw root (dates at the top), or a synthetic world in that layout; for an
        odometry split (lines `SEQ FRAME SIDE`) the KITTI odometry root (`sequences/` at the top,
        `raw.image_path`), prepared with Monodepth2's fixed K (`intrinsics="calib"` is refused).
      split_file: Monodepth2-format split ("DATE/DATE_drive_XXXX_sync FRAME l|r" per line).
      out_dir: TFDS data_dir; the split goes to OUT/kitti_triplets/<split_name>/1.0.0.
      split_name: TFDS split name, e.g. "train", "val".
      height, width: stored image size in pixels (multiples of 8).
      image_format: "png" (lossless) or "jpeg" (with `jpeg_quality`).
      intrinsics: "monodepth2" (its fixed normalised KITTI K) or "calib" (per drive, from
        DATE/calib_cam_to_cam.txt P_rect_02 / P_rect_03 normalised by the native image size).
      num_workers: processes that read, resize and encode images (1 = in this process).
      num_shards: array_record files to write; None lets TFDS size them (64 MiB..1 GiB).
        Record order is the split order whatever the number of shards.
      target_scales: also store frame 0 at scales 1..3 (its LANCZOS chain, raw uint8: +1/3
        of a raw frame per example), which the loader then reads instead of computing. With
        jpeg the chain is that of the un-encoded frame (Monodepth2's), not of the decoded one.
      compression: the shards' array_record compression: "zstd" (level 3, TFDS's) or "none"
        (the fastest to read; with "raw" images ~2x faster to read on the project's VM, and
        as large as the pixels).

    Raises:
      ValueError naming the file (and split line) for a malformed split line, a missing or
      corrupt frame, a missing calibration file or key, or an existing dataset built with
      other settings.
    """
    from data_pipelines.kitti import raw

    raw_dir = pathlib.Path(raw_dir)
    split_file = pathlib.Path(split_file)
    if not raw_dir.is_dir():
        raise ValueError(f"raw directory {raw_dir} does not exist")
    if not split_file.is_file():
        raise ValueError(f"split file {split_file} does not exist")
    if not split_name or not split_name.replace("_", "").isalnum():
        raise ValueError(f"split name must be letters, digits or '_', got {split_name!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    from xdistill_jax.output_dirs import check_output_dir

    check_output_dir(out_dir, "--out")
    settings = triplets.TripletSettings(
        height=height,
        width=width,
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        intrinsics=intrinsics,
        target_scales=target_scales,
        compression=compression,
    )
    split_sha256 = _sha256(split_file)

    from data_pipelines.kitti import tfds_builder

    target = tfds_builder.dataset_dir(out_dir, split_name)
    if (target / "dataset_info.json").is_file():
        _check_existing(out_dir, split_name, settings, split_sha256, split_file, raw_dir)
        log.info("%s is complete; leaving it alone", target)
        return target

    # A run killed before TFDS renamed its temporary directory leaves it behind; it can never
    # be completed, only waste space (a whole KITTI split).
    for stale in target.parent.glob(f"incomplete.*_{target.name}"):
        log.warning("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)

    lines = raw.read_split_file(split_file)  # errors name the file and line
    if not lines:
        raise ValueError(f"split file {split_file} has no lines")
    if num_shards is not None and not 1 <= num_shards <= len(lines):
        # TFDS failed after encoding every image (an AssertionError, or 46 KB of record bytes)
        raise ValueError(f"--shards must be from 1 to the split's {len(lines)} lines, got {num_shards}")
    _check_files_exist(raw_dir, lines, split_file, settings)

    builder = tfds_builder.KittiTriplets(
        out_dir=out_dir,
        split_name=split_name,
        raw_dir=raw_dir,
        lines=lines,
        split_file=split_file,
        locations=split_line_locations(split_file),
        split_sha256=split_sha256,
        settings=settings,
        num_workers=num_workers,
    )
    # Nothing is downloaded; keep TFDS's download folder out of OUT.
    options = tfds_builder.ARRAY_RECORD_OPTIONS[settings.compression]
    with tempfile.TemporaryDirectory(prefix="xdistill-prepare-") as scratch, \
            tfds_builder.tfds_writer_hooks(options):
        builder.download_and_prepare(
            download_dir=scratch,
            download_config=_download_config(num_shards),
        )
    n = builder.info.splits[split_name].num_examples
    if n != len(lines):  # a builder that dropped lines must not pass as complete
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"{target}: wrote {n} examples for {len(lines)} split lines")
    written = tfds_builder.shard_compressions(target)
    if not written or set(written.values()) != {settings.compression}:
        # Its metadata would claim a compression the shards do not have.
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"{target}: asked for compression {settings.compression!r}, the installed "
                         f"TFDS wrote {written or 'no shards'}; prepare with compression 'zstd'")
    log.info("wrote %d triplets to %s", n, target)
    return target


def split_line_locations(split_file: pathlib.Path) -> list[str]:
    """"FILE:LINENO" of every non-blank line (the lines `raw.read_split_file` returns)."""
    with open(split_file) as f:
        return [f"{split_file}:{n}" for n, text in enumerate(f, 1) if text.strip()]


def _check_files_exist(raw_dir, lines, split_file, settings) -> None:
    """Fails fast, naming the split line, when a frame or calibration file is missing."""
    from data_pipelines.kitti import raw

    for where, line in zip(split_line_locations(split_file), lines):
        where = f"{where} ({str(line)!r})"
        try:
            paths = raw.triplet_paths(raw_dir, line, triplets.FRAME_OFFSETS)
        except ValueError as e:  # frame 0 of a drive has no frame -1; a triplet of two formats
            raise ValueError(f"{where}: {e}") from None
        for offset in triplets.FRAME_OFFSETS:
            path = pathlib.Path(paths[offset])
            if not path.is_file():
                what = "frame" if offset == 0 else f"neighbour frame {offset:+d}"
                other = path.with_suffix(".png" if path.suffix == ".jpg" else ".jpg")  # also looked for
                raise ValueError(f"{where}: missing {what}: {path} (nor {other.name})")
        if settings.intrinsics == "calib" and line.is_odometry:
            raise ValueError(f"{where}: an odometry sequence's line; --intrinsics calib reads a raw drive's "
                             "DATE/calib_cam_to_cam.txt: prepare odometry splits with --intrinsics monodepth2 "
                             "(Monodepth2 trains its odom split with that fixed K)")
        if settings.intrinsics == "calib":
            calib = raw_dir / line.folder.split("/")[0] / "calib_cam_to_cam.txt"
            if not calib.is_file():
                raise ValueError(f"{where}: missing calibration file {calib}")


def _download_config(num_shards: int | None):
    import tensorflow_datasets as tfds

    return tfds.download.DownloadConfig(
        num_shards=num_shards,
        # One writer in this process: the examples come from our own (optional) worker pool.
        beam_runner=None,
    )


def _check_existing(out_dir, split_name, settings, split_sha256, split_file, raw_dir=None) -> None:
    from data_pipelines.kitti import tfds_builder

    meta = tfds_builder.read_metadata(out_dir, split_name)
    target = tfds_builder.dataset_dir(out_dir, split_name)
    # Settings added after a dataset was written are absent from its metadata: they had
    # their default value then.
    stored = {**triplets.TripletSettings().as_dict(), **meta.get("settings", {})}
    if stored != settings.as_dict():
        raise ValueError(
            f"{target} exists with settings {meta.get('settings')}, not the requested "
            f"{settings.as_dict()}; delete it or choose another --out"
        )
    if meta.get("split_sha256") != split_sha256:
        raise ValueError(
            f"{target} exists but was built from a different split file "
            f"({meta.get('split_file')}) than {split_file}; delete it or choose another --out"
        )
    # Another raw tree may be the same one moved, or other data: said, not refused (preparing a
    # KITTI split again takes hours). Datasets written before the field existed have none.
    stored_raw = meta.get("raw_dir")
    if raw_dir is not None and stored_raw and stored_raw != str(pathlib.Path(raw_dir).absolute()):
        log.warning("%s was prepared from %s, not %s; leaving it alone (delete it to prepare the "
                    "split again from %s)", target, stored_raw, pathlib.Path(raw_dir).absolute(), raw_dir)
