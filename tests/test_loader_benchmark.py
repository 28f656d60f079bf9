"""The loader benchmark (`xdistill bench --loader`, benchmarks/loader_benchmark.py) with grain
worker processes, as training loads, and the windows benchmarks/train_feed.py reads."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import time

import pytest

from xdistill_jax import loader_benchmark

pytestmark = pytest.mark.slow


def test_child_processes_cpu_time_is_counted():
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while loader_benchmark._children_cpu_s() < 0.5 and time.time() < deadline:
            time.sleep(0.1)
        assert 0.5 <= loader_benchmark._children_cpu_s() < 5
    finally:
        child.kill()
        child.wait()


def test_worker_processes_time_the_same_batches(tmp_path):
    kwargs = dict(examples=12, height=32, width=96, batch=4, epochs=2, workdir=str(tmp_path),
                  image_format="raw", target_scales=True, compression="none", source_scales=False,
                  verbose=False)
    alone = loader_benchmark.run(threads=0, workers=0, **kwargs)
    workers = loader_benchmark.run(threads=None, workers=2, **kwargs)
    # 3 batches an epoch, 2 epochs, the first batch untimed (warm-up)
    assert alone["examples_timed"] == workers["examples_timed"] == (3 * 2 - 1) * 4
    assert (alone["workers"], workers["workers"]) == (0, 2)
    assert workers["cpu_s"] > 0 and workers["examples_per_s"] > 0
    # one store, prepared once: the second run found the first's
    assert len(list(tmp_path.glob("tfds_*"))) == 1


def test_a_raw_tree_interrupted_while_writing_frames_is_written_again(tmp_path):
    """A first run stopped while it wrote the frames left the folder without the split file: every
    rerun failed with FileExistsError (a traceback, exit 1) until 2026-12-07."""
    folder = tmp_path / "raw" / "2011_09_26" / "2011_09_26_drive_0001_sync" / "image_02" / "data"
    folder.mkdir(parents=True)
    (folder / "0000000000.png").write_bytes(b"cut short")
    split = loader_benchmark.write_raw_tree(tmp_path / "raw", 3, 8, 24)
    assert split.read_text().splitlines() == [f"2011_09_26/2011_09_26_drive_0001_sync {f} l" for f in (1, 2, 3)]
    assert sorted(p.name for p in folder.iterdir()) == [f"{f:010d}.png" for f in range(5)]
    from PIL import Image

    assert Image.open(folder / "0000000000.png").size == (24, 8)


def test_a_folder_of_another_number_of_examples_is_refused(tmp_path):
    """A workdir prepared for 4 examples, asked for 40: timed 2 examples and reported their rate as
    the benchmark's (until 2026-12-07); now refused naming both counts, before any work."""
    loader_benchmark.write_raw_tree(tmp_path / "raw", 4, 8, 24)
    with pytest.raises(ValueError, match=rf"{tmp_path} holds the benchmark data of 4 examples .* not the 40 asked for"):
        loader_benchmark.prepare_data(tmp_path, examples=40, height=8, width=24, say=lambda *a: None)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def _train_feed():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "train_feed.py"
    spec = importlib.util.spec_from_file_location("train_feed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_feed_takes_the_windows_between_compile_and_final_save():
    summarise = _train_feed().summarise
    windows = [{"window_images_per_s": r, "input_wait_frac": f}
               for r, f in [(20.0, 0.01), (700.0, 0.1), (650.0, 0.3), (600.0, 0.2), (90.0, 0.0)]]
    s = summarise(windows)
    assert (s["windows"], s["images_per_s"], s["input_wait_frac"]) == (3, 650.0, 0.2)
    assert summarise(windows[:2])["images_per_s"] == 360.0  # too few to drop any: all of them
    with pytest.raises(RuntimeError, match="no window"):
        summarise([])
