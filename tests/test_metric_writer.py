"""metrics.jsonl and TensorBoard across a kill and a resume (xdistill_jax/metric_writer.py)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import pytest

from xdistill_jax.metric_writer import MetricWriter


def _events(workdir):
    """{event file name: [(step, tag or "purge from", value)]} read from the TFRecord framing."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    out = {}
    for path in sorted((workdir / "tensorboard").iterdir()):
        data, i, found = path.read_bytes(), 0, []
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                found.append((event.step, "purge from", None))
            found += [(event.step, v.tag, round(v.simple_value, 6)) for v in event.summary.value]
        out[path.name] = found
    return out


def test_a_killed_run_logs_up_to_the_kill_and_its_resume_hides_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboardX")
    first = MetricWriter(tmp_path)
    first.truncate_after(0)  # a fresh run
    for step in (1, 2, 3, 4):
        first.write_scalars(step, {"loss": step / 10})
    # killed here: never closed. Every logged step must be on disk (the default 120 s flush lost them)
    (events,) = _events(tmp_path).values()
    assert [e for e in events if e[1] == "train/loss"] == [(s, "train/loss", s / 10) for s in (1, 2, 3, 4)]
    assert (1, "purge from", None) in events

    resumed = MetricWriter(tmp_path)  # the checkpoint was step 2: steps 3 and 4 are redone
    assert resumed.truncate_after(2) == {(1, "train"), (2, "train")}
    for step in (3, 4):
        resumed.write_scalars(step, {"loss": step / 100})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 0.1), (2, 0.2), (3, 0.03), (4, 0.04)]
    files = _events(tmp_path)
    assert len(files) == 2
    new = [events for events in files.values() if (3, "purge from", None) in events]
    assert len(new) == 1, files  # TensorBoard hides the first file's steps >= 3
    assert [e for e in new[0] if e[1] == "train/loss"] == [(3, "train/loss", 0.03), (4, "train/loss", 0.04)]


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(tmp_path / "w", enabled=False)
    assert writer.truncate_after(3) == set()
    writer.write_scalars(1, {"loss": 1.0})
    assert writer.write_image(1, "x", [[0.5]]) is None
    writer.close()
    assert not (tmp_path / "w").exists()


def _run_writer(tmp_path, lines):
    """`lines` run as a fresh Python process (the writer's workdir its argv[1]); its stdout. Skips
    where tensorboardX or torch is absent (then there is nothing to hide)."""
    pytest.importorskip("tensorboardX")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed here: there is nothing to hide")
    out = subprocess.run([sys.executable, "-c", "\n".join(lines), str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("torch_first", [False, True])
def test_the_event_file_is_written_without_importing_torch(tmp_path, torch_first):
    """tensorboardX imports torch where it is installed (2.2 s of a run's start): the writer
    loads it with torch hidden, and torch stays importable after; where torch is already loaded
    nothing is hidden. The scalars and an image reach the event file either way."""
    stdout = _run_writer(tmp_path, [
        "import sys",
        "import torch" if torch_first else "",
        "from xdistill_jax.metric_writer import MetricWriter",
        "w = MetricWriter(sys.argv[1])",
        "w.write_scalars(1, {'loss': 0.5})",
        "w.write_image(1, 'disp', [[0.0, 1.0]])",
        "w.close()",
        "print('torch loaded:', 'torch' in sys.modules)",
        "import torch",
        "print('torch imports:', torch.zeros(2).shape == (2,))",
    ])
    assert stdout.splitlines() == [f"torch loaded: {torch_first}", "torch imports: True"]
    (events,) = _events(tmp_path).values()
    assert (1, "train/loss", 0.5) in events
    assert any(tag == "disp" for _, tag, _ in events)


def test_torch_is_hidden_from_the_loading_thread_alone(tmp_path):
    """While tensorboardX loads without torch, another thread that imports torch gets it (the
    first form put None in sys.modules for the whole process: found in review). The other thread
    starts when tensorboardX's import begins (a finder asked first; it cannot wait there: finders
    run under the global import lock) and looks torch up while tensorboardX loads (~0.3 s)."""
    stdout = _run_writer(tmp_path, [
        "import importlib.abc, sys, threading",
        "seen, threads = [], []",
        "def other():",
        "    try:",
        "        import torch",
        "        seen.append('imported')",
        "    except ImportError as e:",
        "        seen.append(repr(e))",
        "class During(importlib.abc.MetaPathFinder):",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'tensorboardX' and not threads:",
        "            threads.append(threading.Thread(target=other))",
        "            threads[0].start()",
        "        return None",
        "sys.meta_path.insert(0, During())  # asked before the path finder, after the writer's",
        "from xdistill_jax.metric_writer import MetricWriter",
        "w = MetricWriter(sys.argv[1])",
        "w.write_scalars(1, {'loss': 0.5})",
        "w.close()",
        "threads[0].join()",
        "print(seen)",
    ])
    assert stdout.strip() == "['imported']"
    (events,) = _events(tmp_path).values()
    assert (1, "train/loss", 0.5) in events
