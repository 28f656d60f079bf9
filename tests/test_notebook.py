"""Executes notebooks/xdistill_colab.ipynb at a tiny size, so the Colab walkthrough cannot rot.

The code cells run in-process, in order, in one namespace (nbformat/nbclient are not needed: the
notebook is JSON and uses no magics). After the `parameters` cell, the sizes are replaced by the
shared test workdir's (tests/eval_workdir.py); unlike that baseline run, the notebook trains with
distillation (teacher logits precomputed from the world's labels), so both paths are exercised.
"""

import json
import os
import pathlib

import jax
import pytest

from eval_workdir import TRAIN_OVERRIDES, WORLD

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "xdistill_colab.ipynb"


def test_colab_notebook_runs(tmp_path):
    nb = json.loads(NOTEBOOK.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", []), "the first code cell holds the parameters"
    tiny = {
        "WORK": tmp_path,
        "WORLD_ARGS": {"--seed": WORLD["seed"], "--drives": WORLD["drives"], "--frames": WORLD["frames"],
                       "--width": WORLD["width"], "--height": WORLD["height"],
                       "--make3d-images": WORLD["make3d_images"],
                       "--make3d-size": "x".join(map(str, WORLD["make3d_size"])),
                       "--lidar-azimuths": WORLD["lidar_azimuths"], "--workers": 1},
        "HEIGHT": TRAIN_OVERRIDES["data.height"], "WIDTH": TRAIN_OVERRIDES["data.width"],
        "TRAIN_OVERRIDES": {k: v for k, v in TRAIN_OVERRIDES.items() if k != "distill.weight"},
        "DISTILL_WEIGHT": 0.1, "BATCH_SIZE": 4,
        "REQUIRE_ACCELERATOR": False,  # the suite runs on the CPU, also where a GPU is attached
    }
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), \
            f"code cell {i} uses IPython syntax, which plain Python (and this test) cannot run"
        exec(compile(source, f"{NOTEBOOK.name}[code cell {i}]", "exec"), namespace)
        if i == 0:
            assert set(tiny) <= set(namespace), f"parameters cell lacks {set(tiny) - set(namespace)}"
            namespace.update(tiny)

    results = namespace["RESULTS"]
    assert set(results) == {"eigen-test_files-step2", "make3d-step2", "pose-test_files-step2"}
    assert results["eigen-test_files-step2"]["num_images"] == WORLD["frames"]
    assert results["make3d-step2"]["num_images"] == WORLD["make3d_images"]
    assert namespace["RUN"] == tmp_path / "run_lambda0.1"  # one workdir per lambda
    metrics = [json.loads(s) for s in (namespace["RUN"] / "metrics.jsonl").read_text().splitlines()]
    assert any("distill_loss" in m for m in metrics if m["split"] == "train")  # X-Distill, not the baseline
    assert len(list(namespace["PRED"].glob("*_depth.npy"))) == WORLD["frames"]
    assert namespace["canvas"].size == (WORLD["width"], 2 * WORLD["height"])


def _code_cells():
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("driver, extra", [("580.95.05", "cuda13"), ("550.54.15", "cuda12")])
def test_a_gpu_runtime_whose_jax_runs_on_the_cpu_stops_at_the_install_cell(tmp_path, monkeypatch, driver, extra):
    """Colab opens the notebook on a GPU runtime. Where an NVIDIA driver is installed (a fake
    `nvidia-smi` on PATH here) the install cell picks JAX's CUDA build for its driver (the package's
    `cuda13` extra from driver 580 on, else `cuda12`), and if JAX still runs on the CPU (this
    process's JAX) it stops, naming what to install with the package's own jax range, instead of
    training on the CPU unnoticed. REQUIRE_ACCELERATOR = False lets it go on."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho {driver}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert jax.default_backend() == "cpu"
    parameters, install = _code_cells()[:2]
    namespace = {"__name__": "__notebook__"}
    exec(compile(parameters, "parameters", "exec"), namespace)
    assert namespace["REQUIRE_ACCELERATOR"] is True  # the notebook's default
    with pytest.raises(RuntimeError) as err:
        exec(compile(install, "install", "exec"), namespace)
    assert namespace["EXTRA"] == extra
    message = str(err.value)
    assert "this runtime has a GPU but JAX" in message and "runs on cpu" in message, message
    assert f'pip install -U "jax[{extra}]<0.13,>=0.8.2"' in message, message  # setup.cfg's range
    namespace["REQUIRE_ACCELERATOR"] = False
    exec(compile(install, "install", "exec"), namespace)
    assert callable(namespace["xd"])


def test_the_notebooks_own_training_settings_load_and_validate():
    """`test_colab_notebook_runs` trains with the suite's tiny settings in place of the notebook's
    (so that its compile comes from the cache); the notebook's own TRAIN_OVERRIDES and
    DISTILL_WEIGHT, as its training cell passes them, must still name existing keys and valid
    values of configs/synthetic_demo.py:smoke."""
    from xdistill_jax import config_utils

    namespace = {"__name__": "__notebook__"}
    exec(compile(_code_cells()[0], "parameters", "exec"), namespace)
    overrides = [f"--config.{k}={v}" for k, v in namespace["TRAIN_OVERRIDES"].items()]
    overrides.append(f"--config.distill.weight={namespace['DISTILL_WEIGHT']}")
    config_file = NOTEBOOK.parent.parent / "configs" / "synthetic_demo.py"
    config = config_utils.config_from_args(f"{config_file}:smoke", overrides)
    for key, value in namespace["TRAIN_OVERRIDES"].items():
        group, leaf = key.split(".")
        got = config[group][leaf]
        assert got == (() if value == "()" else value), (key, got, value)
    assert config.optim.lr_drop_epochs == ()  # "()" parsed as an empty tuple: a constant rate
    assert config.distill.weight == namespace["DISTILL_WEIGHT"] > 0
