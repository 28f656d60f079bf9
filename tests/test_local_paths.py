"""A URL where a path is expected (`gs://bucket/run`): refused naming the flag or config key,
before anything is read or written. Every reader and writer here is a local-filesystem one; until
2026-12-06 `xdistill train --workdir gs://bucket/run` trained into `./gs:/bucket/run`."""

import pathlib

import pytest

from xdistill_jax import cli, config_utils, local_paths, training_loop

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs/synthetic_demo.py") + ":smoke"


@pytest.mark.parametrize("value, scheme", [
    ("gs://bucket/run", "gs://"), ("s3://b/x", "s3://"), ("file:///tmp/x", "file://"),
    ("flax:gs://b/teacher", "gs://"), ("--out=hdfs://n/x", "hdfs://"),
    ("runs/xd", None), ("/mnt/bucket/run", None), ("C:\\runs", None), ("a:b", None), ("", None)])
def test_url_scheme(value, scheme):
    assert local_paths.url_scheme(value) == scheme


@pytest.mark.parametrize("argv, flag", [
    (["train", "--config", CONFIG, "--workdir", "gs://bucket/run"], "--workdir=gs://bucket/run"),
    (["prepare", "--raw", "raw", "--split-file", "s.txt", "--out", "gs://b/tfds", "--split", "train"],
     "--out=gs://b/tfds"),
    (["predict", "--workdir", "w", "--out", "o", "img.png", "s3://b/img.png"], "INPUT=s3://b/img.png"),
    (["teacher", "precompute", "--backend", "flax:gs://b/teacher", "--dataset", "d", "--out", "o"],
     "--backend=flax:gs://b/teacher"),
    (["eval", "--workdir", "w", "--data", "gs://b/kitti"], "--data=gs://b/kitti"),
])
def test_a_url_argument_is_refused_naming_the_flag(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"xdistill {argv[0]}: {flag}: a URL" in err and "gcsfuse" in err
    assert list(tmp_path.iterdir()) == []  # no ./gs: directory, nothing written


@pytest.mark.parametrize("key", config_utils.PATH_KEYS)
def test_a_url_in_a_config_path_is_refused_naming_the_key(key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    value = "gs://bucket/x.msgpack" if key == "model.init" else "gs://bucket/x"
    argv = ["train", "--config", CONFIG, "--workdir", "run", f"--config.{key}={value}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"config.{key}: '{value}' is a URL (gs://)" in err and "gcsfuse" in err
    assert list(tmp_path.iterdir()) == []


def test_train_and_evaluate_refuses_a_url_workdir(tmp_path, monkeypatch):
    """The library entry point, too (the CLI's check is not the only door)."""
    monkeypatch.chdir(tmp_path)
    config = config_utils.load_config_file(CONFIG)
    with pytest.raises(config_utils.ConfigError, match=r"workdir=gs://bucket/run: a URL \(gs://\)"):
        training_loop.train_and_evaluate(config, "gs://bucket/run")
    assert list(tmp_path.iterdir()) == []

