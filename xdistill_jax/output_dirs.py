"""Checks of an output folder or file before a command computes anything (`predict --out`,
`eval --out`, `bench --json`)."""

from __future__ import annotations

import os
import pathlib


def check_output_dir(out_dir, option: str = "--out") -> None:
    """Refuse a folder that cannot be one (a file, or a path below one) or that this user may not
    write in (the folder, or the nearest existing folder above it): ValueError naming `option`."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{option} {out_dir} exists and is not a folder")
    parent = out_dir
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor
        if parent.is_symlink():  # a link to nothing: mkdir would fail with "File exists"
            raise ValueError(f"{option} {out_dir}: {parent} is a broken symbolic link "
                             f"(to {os.readlink(parent)}, which does not exist)")
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{option} {out_dir}: cannot make the folder: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):  # False on a read-only file system too
        what = "cannot write in it" if parent == out_dir else f"cannot make the folder in {parent}"
        raise ValueError(f"{option} {out_dir}: {what} (permission denied or read-only)")


def check_output_file(path, option: str) -> None:
    """Refuse a file path that cannot be written: a folder, or a place `check_output_dir` refuses
    for its folder. ValueError naming `option`."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    check_output_dir(path.parent, f"{option} {path}: its folder")
