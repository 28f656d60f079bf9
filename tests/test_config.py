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
    assert c.data.num_workers == -1  # a worker process per core: one process's threads starve a GPU
    # Monodepth2's --num_layers 50: both encoders ResNet-50, both from the one ImageNet file (the
    # pose encoder stayed ResNet-18 until 2026-12-07, which that file could not initialise)
    r50 = config_utils.load_config_file(str(CONFIGS / "kitti_resnet50_640x192.py"))
    assert (r50.model.num_layers, r50.model.pose_num_layers) == (50, 50)
    # ImageNet encoders as Monodepth2's default (training asks for the file); were "scratch"
    hr = config_utils.load_config_file(str(CONFIGS / "kitti_resnet18_1024x320.py"))
    assert c.model.init == r50.model.init == hr.model.init == "imagenet"
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
    (["--config.distill.translator.output_stride=3"], "distill.translator.output_stride"),
    (["--config.distill.translator.output_stride=64"], "distill.translator.output_stride"),
    (["--config.distill.translator.features=0"], "distill.translator.features"),
    (["--config.distill.translator.dilations=(1, 0)"], "distill.translator.dilations"),
    (["--config.run.state_layout=cudnn"], "run.state_layout"),
    (["--config.model.kernel_layout=OIHW"], "model.kernel_layout"),
    (["--config.model.gpu_channel_padding=maybe"], "model.gpu_channel_padding"),
    (["--config.distill.grouping=geometirc"], "distill.grouping"),
    (["--config.optim.b1=1.5"], "optim.b1"),
    (["--config.optim.b2=-0.1"], "optim.b2"),
    (["--config.optim.eps=0"], "optim.eps"),
    (["--config.data.num_workers=-2"], "data.num_workers"),
    (["--config.distill.scale=7"], "distill.scale"),  # a traceback in the first train step
    (["--config.distill.scale=-1"], "distill.scale"),
    (["--config.optim.lr_drop_epochs=(0,)"], "optim.lr_drop_epochs"),
    (["--config.optim.lr_drop_epochs=(10, 5)"], "optim.lr_drop_epochs"),
    (["--config.optim.lr_drop_steps=(-3,)"], "optim.lr_drop_steps"),  # the lr dropped from step 0
    (["--config.optim.lr_drop_steps=(5, 5)"], "optim.lr_drop_steps"),  # one drop, not two
    (["--config.run.seed=-1"], "run.seed"),  # a numpy traceback after the workdir was written
    (["--config.run.seed=9223372036854775808"], "run.seed"),  # an OverflowError in jax.random.key
    # the translator reads every scale with multi_scale: a scale asked for was ignored silently
    (["--config.distill.translator.multi_scale=True", "--config.distill.scale=3"], "distill.scale"),
])
def test_impossible_values_name_the_key(args, key):
    with pytest.raises(config_utils.ConfigError, match=key.replace(".", r"\.")):
        config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), args)


@pytest.mark.parametrize("spec", ["synthetic_demo.py", "synthetic_demo.py:smoke"])  # (1500,) and ()
@pytest.mark.parametrize("value, message", [
    ("(2.9,)", "expected a tuple of int"),    # was truncated to step 2
    ("('a',)", "expected a tuple of int"),    # was a traceback after config.json was written
    ("(True,)", "expected a tuple of int"),
])
def test_drop_steps_are_typed_even_when_empty(spec, value, message):
    """An empty tuple has no element to take the type from: the field's type comes from
    config_defaults.TUPLE_ELEMENT_TYPES, whichever the config file's value."""
    with pytest.raises(config_utils.ConfigError, match=rf"optim\.lr_drop_steps: {message}"):
        config_utils.config_from_args(str(CONFIGS / spec), [f"--config.optim.lr_drop_steps={value}"])
    c = config_utils.config_from_args(str(CONFIGS / spec), ["--config.optim.lr_drop_steps=(3, 7)"])
    assert c.optim.lr_drop_steps == (3, 7)


def test_every_tuple_field_has_an_element_type():
    from xdistill_jax import config_defaults

    specs = [CONFIGS / "synthetic_demo.py:smoke", CONFIGS / "demo.py"] + sorted(CONFIGS.glob("*.py"))
    for spec in specs:
        flat = config_utils._flatten(config_utils.load_config_file(str(spec)).to_dict())
        tuples = {k for k, v in flat.items() if isinstance(v, (tuple, list))}
        assert tuples <= set(config_defaults.TUPLE_ELEMENT_TYPES), (spec, tuples)


def test_bad_train_overrides_exit_2_before_the_workdir_is_made(tmp_path, capsys, monkeypatch):
    """Both were tracebacks from the first train step, after config.json and checkpoints/ were
    written (and a resume crashed the same way): validate() refuses them before training starts."""
    from xdistill_jax import train

    def reached(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train_and_evaluate", reached)
    for arg, key in (("--config.optim.lr_drop_steps=('a',)", "optim.lr_drop_steps"),
                     ("--config.distill.scale=7", "distill.scale")):
        workdir = tmp_path / "w"
        assert cli.main(["train", "--config", str(CONFIGS / "synthetic_demo.py") + ":smoke",
                         "--workdir", str(workdir), arg]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err
        assert not workdir.exists()


@pytest.mark.parametrize("spec, message", [
    ("synthetic_demo.py:smok", r"config '.*synthetic_demo\.py:smok': get_config\('smok'\) failed: ValueError"),
    ("kitti_resnet18_640x192.py:x", r"config '.*kitti_resnet18_640x192\.py:x': get_config\('x'\) failed: TypeError"),
])
def test_a_config_variant_that_does_not_exist_is_a_config_error(spec, message):
    """Exit status 2 with the spec named (a ConfigError), not a traceback from get_config."""
    with pytest.raises(config_utils.ConfigError, match=message):
        config_utils.load_config_file(str(CONFIGS / spec))


def test_more_devices_than_exist_is_a_config_error():
    from xdistill_jax import train

    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), ["--config.mesh.num_devices=4096"])
    with pytest.raises(config_utils.ConfigError, match=r"config\.mesh\.num_devices=4096 but only"):
        train.make_mesh(config)


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


def test_config_json_leaves_out_the_writing_process_id(tmp_path):
    """A multi-host run's config.json is written by process 0: its process id, saved, would be
    wrong for every other host resuming from the file; -1 (give or detect your own) instead."""
    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), [
        "--config.distributed.enabled=True", "--config.distributed.coordinator_address=h0:1234",
        "--config.distributed.num_processes=4", "--config.distributed.process_id=0"])
    config_utils.save_config(config, tmp_path)
    back = config_utils.load_config(tmp_path).distributed
    assert (back.enabled, back.coordinator_address, back.num_processes, back.process_id) == (True, "h0:1234", 4, -1)
    assert config.distributed.process_id == 0  # the running config is not changed


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


def test_translator_fields_are_the_translators_defaults_and_override_from_the_command_line(tmp_path):
    """distill.translator spells out models.translator.Translator's defaults, so each field can be
    overridden like any key and reaches the network; a config.json saved when the group was empty
    (= the Translator's defaults of that time: full resolution) loads with those filled in, so
    its checkpoint's translator is rebuilt as trained; a changed field is a structural difference."""
    import dataclasses

    import jax

    from xdistill_jax.models.translator import Translator
    from xdistill_jax.objective import Networks

    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"))
    fields = {f.name: f.default for f in dataclasses.fields(Translator) if f.name in config.distill.translator}
    assert fields == config.distill.translator.to_dict() and len(fields) == 4

    assert config.distill.translator.output_stride == 4  # the default since 2026-12-03
    h, w = config.data.height, config.data.width
    for overrides, stride, dilations in ((["--config.distill.translator.dilations=(1, 2)"], 4, (1, 2)),
                                         (["--config.distill.translator.output_stride=1"], 1, (1, 2, 4))):
        changed = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"), overrides)
        translator = Networks.from_config(changed).translator
        assert (translator.output_stride, tuple(translator.dilations)) == (stride, dilations)
        variables = jax.eval_shape(translator.init, jax.random.key(0), jax.numpy.zeros((1, h, w, 1)))
        downs = ["down0", "down1"] if stride == 4 else []
        assert sorted(variables["params"]) == sorted(downs + [f"conv{i}" for i in range(len(dilations))] + ["head"])
        logits = jax.eval_shape(translator.apply, variables, jax.numpy.zeros((2, h, w, 1)))
        assert logits.shape[:3] == (2, h // stride, w // stride)

    old = config_utils.apply_overrides(config, [])
    old.distill.translator = {}
    config_utils.save_config(old, tmp_path)
    loaded = config_utils.load_config(tmp_path)
    assert loaded.distill.translator.to_dict() == {
        "features": 32, "dilations": (1, 2, 4), "output_stride": 1, "multi_scale": False}
    legacy = Networks.from_config(loaded).translator  # what a resume or demo_eval.load_run builds
    variables = jax.eval_shape(legacy.init, jax.random.key(0), jax.numpy.zeros((1, h, w, 1)))
    assert sorted(variables["params"]) == ["conv0", "conv1", "conv2", "head"]  # no stride-2 levels
    full_res = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"),
                                             ["--config.distill.translator.output_stride=1"])
    assert config_utils.structural_differences(loaded, full_res) == []
    assert list(config_utils.differences(loaded, full_res)) == []  # the demo's check
    assert config_utils.structural_differences(loaded, config) == ["distill.translator.output_stride: 1 -> 4"]
    resumed = config_utils.apply_overrides(config_utils.load_config(tmp_path),
                                           ["--config.distill.translator.output_stride=4"])  # `xdistill train` resume
    assert resumed.distill.translator.output_stride == 4


def test_kernel_layout_reaches_every_trained_conv_and_old_config_json_reads_hwio(tmp_path):
    """model.kernel_layout is how the depth, pose and translator nets store their conv kernels:
    "auto" (the default) is OHWI on a GPU or TPU and HWIO (flax's) on the CPU. A run resolves it
    before saving its config.json, and resuming takes the saved layout whatever the platform. A
    config.json saved before the field existed holds HWIO checkpoints: it loads as HWIO, so
    resuming or evaluating it rebuilds the networks it trained, and OHWI is then a structural
    difference (a resume must not say OHWI)."""
    import jax

    from xdistill_jax import config_defaults
    from xdistill_jax.models import conv
    from xdistill_jax.objective import Networks

    assert conv.KERNEL_LAYOUTS == config_defaults.KERNEL_LAYOUTS
    config = config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py"))
    assert config.model.kernel_layout == "auto"

    def kernel_shapes(cfg, platform=None):
        variables = jax.eval_shape(lambda: Networks.from_config(cfg, platform).init(jax.random.key(0), 64, 64))
        params = variables[0] if isinstance(variables, tuple) else variables["params"]
        return {jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if leaf.ndim == 4}

    ohwi = kernel_shapes(config, "gpu")
    assert {k.split("]")[0] for k in ohwi} == {"['depth'", "['pose'", "['translator'"}
    assert ohwi["['depth']['encoder']['conv1']['kernel']"] == (64, 7, 7, 3)
    assert ohwi["['pose']['encoder']['conv1']['kernel']"] == (64, 7, 7, 6)
    assert ohwi["['translator']['down0']['kernel']"] == (32, 3, 3, 1)
    assert kernel_shapes(config, "tpu") == ohwi
    hwio_auto = kernel_shapes(config, "cpu")
    assert hwio_auto.keys() == ohwi.keys()
    assert all(hwio_auto[k] == ohwi[k][1:] + ohwi[k][:1] for k in ohwi)  # OHWI -> HWIO, every kernel
    assert kernel_shapes(config) == hwio_auto  # this test's platform, the CPU
    explicit = config_utils.apply_overrides(config, ["--config.model.kernel_layout=OHWI"])
    assert kernel_shapes(explicit, "cpu") == ohwi

    # resolved: by the platform where no run is saved; by the saved run where one is
    assert config_utils.resolve_kernel_layout(config, "cpu").model.kernel_layout == "HWIO"
    assert config_utils.resolve_kernel_layout(config, "gpu", tmp_path).model.kernel_layout == "OHWI"
    assert config.model.kernel_layout == "auto"  # a resolved copy, the config untouched
    assert config_utils.resolve_kernel_layout(explicit, "cpu") is explicit
    config_utils.save_config(config_utils.resolve_kernel_layout(config, "gpu"), tmp_path / "gpu_run")
    assert config_utils.resolve_kernel_layout(config, "cpu", tmp_path / "gpu_run").model.kernel_layout == "OHWI"

    old = config_utils.apply_overrides(config, [])
    del old.model["kernel_layout"]
    config_utils.save_config(old, tmp_path)
    loaded = config_utils.load_config(tmp_path)
    assert loaded.model.kernel_layout == "HWIO"
    hwio = kernel_shapes(loaded, "gpu")
    assert hwio == hwio_auto
    assert config_utils.resolve_kernel_layout(config, "gpu", tmp_path).model.kernel_layout == "HWIO"
    assert config_utils.structural_differences(loaded, explicit) == ["model.kernel_layout: 'HWIO' -> 'OHWI'"]
    resumed = config_utils.apply_overrides(loaded, [])
    assert config_utils.structural_differences(loaded, resumed) == []


def test_a_damaged_or_foreign_config_json_is_named(tmp_path, capsys):
    """A config.json cut short was a JSONDecodeError traceback from `xdistill train` (and an unnamed
    "Unterminated string" from eval/predict); a teacher workdir's config.json an AttributeError
    traceback. Both: exit 2 naming the file; a converted Monodepth2 folder as --workdir: a hint."""
    from xdistill_jax import inference

    config_utils.save_config(config_utils.config_from_args(str(CONFIGS / "synthetic_demo.py")), tmp_path / "cut")
    path = tmp_path / "cut" / config_utils.CONFIG_JSON
    path.write_text(path.read_text()[:200])
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / config_utils.CONFIG_JSON).write_text('{"variant": "resnet18_tiny", "num_classes": 19}\n')
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "meta.json").write_text("{}\n")
    for name, message in (("cut", r"cut/config\.json: not a readable config\.json \(.*line \d+ column \d+"),
                          ("teacher", r"teacher/config\.json is not an `xdistill train` config \(needs the groups "
                                      r"\['data', 'loss', 'model', 'optim'\], found \['num_classes', 'variant'\]\); "
                                      r"is .*teacher another tool's workdir"),
                          ("converted", r"converted/config\.json does not exist: .*\(a folder `xdistill "
                                        r"convert-weights --monodepth2` wrote: pass it as --monodepth2")):
        assert cli.main(["train", "--workdir", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
        with pytest.raises(inference.ModelLoadError, match=message):
            inference.load_workdir_model(tmp_path / name)


def test_a_resume_keeps_the_model_init_its_run_started_with(tmp_path):
    """A KITTI run started from scratch before the configs said "imagenet" (2026-12-07), resumed
    with its command: config.json was rewritten with "imagenet" (a run labelled with ImageNet
    encoders it never had). The run's own init is kept once it has a checkpoint."""
    kitti = config_utils.config_from_args(str(CONFIGS / "kitti_resnet18_640x192.py"))
    started = config_utils.apply_overrides(kitti, ["--config.model.init=scratch"])
    config_utils.save_config(started, tmp_path)
    assert config_utils.keep_run_init(kitti, tmp_path).model.init == "imagenet"  # no checkpoint: it starts now
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert config_utils.keep_run_init(kitti, tmp_path).model.init == "imagenet"  # an unfinished save is none
    (tmp_path / "checkpoints" / "2").mkdir()
    kept = config_utils.keep_run_init(kitti, tmp_path)
    assert kept.model.init == "scratch" and kitti.model.init == "imagenet"  # a copy
    assert list(config_utils.differences(config_utils.load_config(tmp_path), kept)) == []
