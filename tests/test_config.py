"""Config files, --config overrides, validation and config.json (no compilation anywhere)."""

import pathlib
import re

import pytest

from xdistill_jax import cli, config_utils

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("name", ["kitti_resnet18_640x192", "kitti_resnet50_640x192",
                                  "kitti_resnet18_1024x320", "synthetic_demo"])
def test_every_config_loads_validates_and_documents_its_command(name):
    path = CONFIGS / f"{name}.py"
    config = config_utils.config_from_args(str(path))
    assert "xdistill train --config configs/" in path.read_text()
    assert config.data.height % 32 == 0 and config.data.width % 32 == 0


def test_paper_config_values():
    c = config_utils.load_config_file(str(CONFIGS / "kitti_resnet18_640x192.py"))
    assert (c.optim.lr, c.optim.batch_size, c.optim.epochs, c.optim.lr_drop_epochs) == (1e-4, 12, 20, (14,))
    assert (c.data.height, c.data.width, c.model.num_layers, c.loss.align_corners) == (192, 640, 18, True)
    smoke = config_utils.load_config_file(str(CONFIGS / "synthetic_demo.py") + ":smoke")
    assert (smoke.data.height, smoke.data.width, smoke.optim.num_steps) == (32, 96, 2)


def test_overrides_are_typed():
    base = config_utils.load_config_file(str(CONFIGS / "synthetic_demo.py"))
    c = config_utils.apply_overrides(base, [
        "--config.optim.lr=3e-4", "--config.distill.weight=0", "--config.loss.automask=false",
        "--config.data.dataset_dir=/tmp/x", "--config.optim.lr_drop_epochs=(3, 5)",
        "--config.optim.batch_size", "8"])
    assert c.optim.lr == 3e-4 and isinstance(c.distill.weight, float) and c.distill.weight == 0.0
    assert c.loss.automask is False and c.data.dataset_dir == "/tmp/x"
    assert c.optim.lr_drop_epochs == (3, 5) and c.optim.batch_size == 8
    assert base.optim.lr == 1e-4  # the input config is not modified


@pytest.mark.parametrize("args, key", [
    (["--config.optim.lrr=1"], "optim.lrr"),
    (["--config.nosuch.lr=1"], "nosuch"),
    (["--config.optim.batch_size=1.5"], "optim.batch_size"),
    (["--config.loss.automask=maybe"], "loss.automask"),
    (["--config.optim=1"], "optim"),
    (["--learning-rate=1"], "--learning-rate"),
])
def test_bad_overrides_name_the_key(args, key):
    base = config_utils.load_config_file(str(CONFIGS / "synthetic_demo.py"))
    with pytest.raises(config_utils.ConfigError, match=key.replace(".", r"\.")):
        config_utils.apply_overrides(base, args)


@pytest.mark.parametrize("args, key", [
    (["--config.data.height=100"], "data.height"),
    (["--config.data.width=200"], "data.width"),
    (["--config.distill.weight=-0.5"], "distill.weight"),
    (["--config.distill.mode=medium"], "distill.mode"),
    (["--config.model.num_layers=20"], "model.num_layers"),
    (["--config.loss.min_depth=200"], "loss.min_depth"),
    (["--config.model.dtype=float16"], "model.dtype"),
])
def test_impossible_values_name_the_key(args, key):
    with pytest.raises(config_utils.ConfigError, match=key.replace(".", r"\.")):
        config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), args)


def test_batch_must_divide_over_devices():
    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), ["--config.optim.batch_size=6"])
    with pytest.raises(config_utils.ConfigError, match=r"optim\.batch_size.*4 devices"):
        config_utils.validate(config, num_devices=4)


def test_config_json_round_trip_and_structural_diff(tmp_path):
    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), ["--config.optim.lr=2e-4"])
    config_utils.save_config(config, tmp_path)
    back = config_utils.load_config(tmp_path)
    assert back.to_dict() == config.to_dict()
    assert config_utils.structural_differences(back, config) == []
    other = config_utils.apply_overrides(config, ["--config.model.num_layers=34", "--config.optim.lr=1e-3"])
    assert config_utils.structural_differences(back, other) == ["model.num_layers: 18 -> 34"]
    assert len(list(config_utils.differences(back, other))) == 2
    with pytest.raises(config_utils.ConfigError, match="config.json"):
        config_utils.load_config(tmp_path / "nowhere")


def test_cli_rejects_bad_config_before_building_anything(tmp_path, monkeypatch, capsys):
    from xdistill_jax import train

    def boom(*a, **k):
        raise AssertionError("train_and_evaluate reached")

    monkeypatch.setattr(train, "train_and_evaluate", boom)
    for bad, key in (("--config.optim.lrr=1", "optim.lrr"), ("--config.data.height=33", "data.height")):
        status = cli.main(["train", "--config", str(CONFIGS / "synthetic_demo.py"),
                           "--workdir", str(tmp_path / "w"), bad])
        assert status == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_rejects_wrong_type_negative_lambda_and_batch_over_devices(tmp_path, capsys, monkeypatch):
    """Through `xdistill train` with the real training entry point: each fails with status 2,
    names the key, and compiles nothing (the batch check runs once the device mesh is known)."""
    from xdistill_jax import train

    compiled = []
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: compiled.append(1))
    for bad, key in (("--config.optim.batch_size=two", r"optim\.batch_size"),
                     ("--config.distill.weight=-0.1", r"distill\.weight"),
                     ("--config.optim.batch_size=6", r"optim\.batch_size: 6 .*4 devices")):
        status = cli.main(["train", "--config", str(CONFIGS / "synthetic_demo.py:smoke"),
                           "--workdir", str(tmp_path / "w"), bad])
        assert status == 2, bad
        assert re.search(key, capsys.readouterr().err), bad
    assert not compiled
    assert not (tmp_path / "w" / "checkpoints").exists()
