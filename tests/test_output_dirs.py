"""output_dirs: an output folder refused before any compute, naming the option."""

import os

import pytest

from xdistill_jax.output_dirs import check_output_dir, check_output_file


def test_a_broken_symbolic_link_is_refused_naming_it(tmp_path):
    """A link to nothing passed (a path that does not exist yet) and the later mkdir failed with
    "File exists", after the model had loaded (until 2026-12-07)."""
    link = tmp_path / "out"
    os.symlink(tmp_path / "no" / "such" / "place", link)
    with pytest.raises(ValueError, match=rf"--out {link}: {link} is a broken symbolic link \(to .*no/such/place"):
        check_output_dir(link, "--out")
    with pytest.raises(ValueError, match=rf"--out {link / 'sub'}: {link} is a broken symbolic link"):
        check_output_dir(link / "sub", "--out")
    with pytest.raises(ValueError, match=r"--json .*: its folder .* is a broken symbolic link"):
        check_output_file(link / "bench.json", "--json")


def test_a_new_folder_a_folder_and_a_link_to_one_pass(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper", "--out")
    check_output_dir(tmp_path, "--out")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    check_output_dir(tmp_path / "link", "--out")
    check_output_dir(tmp_path / "link" / "new", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "--out")
