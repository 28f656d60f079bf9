"""The standard KITTI split lists shipped with the project (see README.md in this folder).

`split_file("eigen_zhou/train")` or `split_file("eigen", "test")` -> Path of the .txt list.
Lines are `DATE/DATE_drive_XXXX_sync FRAME SIDE` (odom: `SEQUENCE FRAME SIDE`, both sides in train/val); read them with
`data_pipelines.kitti.raw.read_split_file`.
"""

from __future__ import annotations

from pathlib import Path

SPLITS_DIR = Path(__file__).resolve().parent


def available_splits() -> list[str]:
    """All shipped lists as `folder/stem` names, e.g. `eigen/test_files`."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in SPLITS_DIR.glob("*/*.txt"))


def split_file(name: str, subset: str | None = None) -> Path:
    """Path of a shipped split list.

    Accepted forms: `split_file("eigen")` (the folder's only file, or its test list),
    `split_file("eigen_zhou", "train")`, `split_file("eigen_zhou/train")`,
    `split_file("odom/test_files_09")`. Raises ValueError naming the choices when unknown.
    """
    folder, _, rest = name.partition("/")
    subset = subset or rest or None
    directory = SPLITS_DIR / folder
    if not folder or not directory.is_dir():
        raise ValueError(f"unknown split {name!r}; shipped lists: {', '.join(available_splits())}")
    if subset is None:
        files = sorted(directory.glob("*.txt"))
        tests = [f for f in files if f.name == "test_files.txt"]
        if tests:
            return tests[0]
        if len(files) == 1:
            return files[0]
        raise ValueError(
            f"split {name!r} has several lists ({', '.join(f.stem for f in files)}); name one"
        )
    for candidate in (f"{subset}_files.txt", f"{subset}.txt"):
        path = directory / candidate
        if path.is_file():
            return path
    raise ValueError(f"unknown split {name!r}/{subset!r}; shipped lists: {', '.join(available_splits())}")
