"""PyTorch -> Flax conversion: torch modules built here (tests/torch_nets.py), random weights and BN
statistics, saved as a Monodepth2-style model folder, converted, and the Flax forward compared with
the torch forward (eval and train mode). Plus error reporting and the convert-weights CLI."""

import copy
import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_nets  # noqa: E402  (tests/ helper; needs torch)

from xdistill_jax import cli, convert  # noqa: E402
from xdistill_jax.models.conv import hwio_tree_to  # noqa: E402
from xdistill_jax.models.depth import DepthNet  # noqa: E402
from xdistill_jax.models.pose import PoseNet  # noqa: E402
from xdistill_jax.models.resnet import ResNetEncoder  # noqa: E402

H, W, B = 64, 192, 2

# Converted weights hold flax's HWIO kernels; the networks that read them as they are:
depth_eval = jax.jit(DepthNet(kernel_layout="HWIO").apply)
pose_eval = jax.jit(PoseNet(kernel_layout="HWIO").apply)
depth_train = jax.jit(lambda v, x: DepthNet(kernel_layout="HWIO").apply(v, x, train=True, mutable=["batch_stats"]))


def _rand_images(seed, channels=3, b=B, h=H, w=W):
    return np.random.default_rng(seed).uniform(0, 1, (b, h, w, channels)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    """A Monodepth2-layout folder of random ResNet-18 depth + pose weights, and the torch modules."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    enc, dec = torch_nets.Encoder(18), torch_nets.DepthDecoder()
    penc, pdec = torch_nets.Encoder(18, num_input_images=2), torch_nets.PoseDecoder()
    torch_nets.randomise_batchnorm(enc, torch_nets.nchw(_rand_images(10)), g)
    torch_nets.randomise_batchnorm(penc, torch_nets.nchw(_rand_images(11, channels=6)), g)
    for m in (dec, pdec):
        m.eval()
    folder = tmp_path_factory.mktemp("mono_64x192")
    enc_state = dict(enc.state_dict(), height=H, width=W, use_stereo=False)
    torch.save(enc_state, folder / "encoder.pth")
    torch.save(dec.state_dict(), folder / "depth.pth")
    torch.save(penc.state_dict(), folder / "pose_encoder.pth")
    torch.save(pdec.state_dict(), folder / "pose.pth")
    return folder, (enc, dec, penc, pdec)


@pytest.fixture(scope="module")
def converted(torch_folder):
    return convert.load_monodepth2(torch_folder[0])


def test_load_monodepth2_structure(converted):
    assert (converted["num_layers"], converted["height"], converted["width"]) == (18, H, W)
    for name, model, c in (("depth", DepthNet(kernel_layout="HWIO"), 3), ("pose", PoseNet(kernel_layout="HWIO"), 6)):
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, c)))
        got = jax.tree.map(lambda a: (a.shape, a.dtype), converted[name])
        want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
        assert got == want, name


def test_depth_matches_torch_eval(torch_folder, converted):
    enc, dec = torch_folder[1][:2]
    x = _rand_images(0)
    with torch.no_grad():
        ref = dec(enc(torch_nets.nchw(x)))
    out = depth_eval(converted["depth"], x)
    diffs = {}
    for s in range(4):
        want = torch_nets.nhwc(ref[s])
        assert out[s].shape == want.shape == (B, H // 2**s, W // 2**s, 1)
        diffs[s] = float(np.max(np.abs(np.asarray(out[s]) - want)))
        # the test is only meaningful if the disparity depends on the image
        assert want.std() > 1e-3
    print("depth max abs diff per scale:", diffs)
    assert max(diffs.values()) < 1e-4, diffs
    # The same weights put into OHWI kernels (a GPU's training layout) compute the same disparities.
    ohwi = {**converted["depth"], "params": hwio_tree_to("OHWI", converted["depth"]["params"])}
    assert ohwi["params"]["encoder"]["conv1"]["kernel"].shape == (64, 7, 7, 3)
    out_ohwi = jax.jit(DepthNet().apply)(ohwi, x)
    for s in range(4):
        np.testing.assert_allclose(out_ohwi[s], out[s], rtol=0, atol=1e-6)


def test_pose_matches_torch_eval(torch_folder, converted):
    penc, pdec = torch_folder[1][2:]
    x = _rand_images(1, channels=6)
    with torch.no_grad():
        axisangle, translation = pdec(penc(torch_nets.nchw(x)))
    got_a, got_t = pose_eval(converted["pose"], x)
    want_a, want_t = axisangle[:, 0, 0].numpy(), translation[:, 0, 0].numpy()
    diff = max(np.abs(np.asarray(got_a) - want_a).max(), np.abs(np.asarray(got_t) - want_t).max())
    print("pose max abs diff:", float(diff), "output scale:", float(np.abs(want_t).max()))
    np.testing.assert_allclose(got_a, want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-4, atol=1e-6)


def test_depth_train_mode_matches_torch(torch_folder, converted):
    """train=True: batch-statistics forward and torch's running-stat update (unbiased variance)."""
    enc, dec = (copy.deepcopy(m) for m in torch_folder[1][:2])
    enc.train()
    x = _rand_images(2)
    with torch.no_grad():
        ref = dec(enc(torch_nets.nchw(x)))
    out, updates = depth_train(converted["depth"], x)
    diff = max(float(np.abs(np.asarray(out[s]) - torch_nets.nhwc(ref[s])).max()) for s in range(4))
    print("depth train-mode max abs diff:", diff)
    assert diff < 1e-4
    new_stats = convert.load_torchvision_resnet(
        {k[len("encoder."):]: v for k, v in enc.state_dict().items()}, 18)["batch_stats"]
    old_stats = converted["depth"]["batch_stats"]["encoder"]
    got = updates["batch_stats"]["encoder"]
    for path in (("bn1", "var"), ("layer4_1", "bn2", "mean"), ("layer4_1", "bn2", "var"),
                 ("layer2_0", "downsample_bn", "var")):
        g, w, o = got, new_stats, old_stats
        for k in path:
            g, w, o = g[k], w[k], o[k]
        assert not np.allclose(w, o)  # the update did something
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_torchvision_resnet_conversion(torch_folder, converted, tmp_path):
    """A plain torchvision state dict (with fc.*) converts to the same encoder as encoder.pth;
    for 2 input images the ImageNet conv1 is tiled and halved."""
    enc = torch_folder[1][0]
    path = tmp_path / "resnet18.pth"
    torch.save(enc.encoder.state_dict(), path)  # keys conv1.weight ..., fc.weight, fc.bias
    assert "fc.weight" in torch.load(path, weights_only=True)
    single = convert.load_torchvision_resnet(path, 18)
    want = {"params": converted["depth"]["params"]["encoder"],
            "batch_stats": converted["depth"]["batch_stats"]["encoder"]}
    jax.tree.map(np.testing.assert_array_equal, single, want)

    double = convert.load_torchvision_resnet(path, 18, num_input_images=2)
    k1, k2 = single["params"]["conv1"]["kernel"], double["params"]["conv1"]["kernel"]
    assert k2.shape == (7, 7, 6, 64)
    np.testing.assert_allclose(k2, np.concatenate([k1, k1], axis=2) / 2)
    np.testing.assert_array_equal(double["params"]["layer3_1"]["conv2"]["kernel"],
                                  single["params"]["layer3_1"]["conv2"]["kernel"])

    # ImageNet-style start: a freshly initialised PoseNet gets the tiled encoder
    pose_init = jax.eval_shape(PoseNet(kernel_layout="HWIO").init, jax.random.key(0), jnp.zeros((1, 64, 64, 6)))
    started = convert.insert_encoder(pose_init, double)
    assert started["params"]["encoder"] is double["params"]
    assert started["params"]["decoder"] is pose_init["params"]["decoder"]
    expected = r"shape mismatch for params/conv1/kernel: \(7, 7, 3, 64\), expected \(7, 7, 6, 64\)"
    with pytest.raises(ValueError, match=expected):
        convert.insert_encoder(pose_init, single)


def test_resnet50_matches_torch():
    """Bottleneck stride placement (v1.5), projection shortcuts and channel counts of ResNet-50."""
    torch.manual_seed(3)
    enc = torch_nets.Encoder(50)
    x = _rand_images(4, b=2, h=32, w=64)
    calib = torch_nets.nchw(_rand_images(5, b=2, h=32, w=64))
    torch_nets.randomise_batchnorm(enc, calib, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = enc(torch_nets.nchw(x))
    variables = convert.load_torchvision_resnet(enc.encoder.state_dict(), 50)
    feats = jax.jit(ResNetEncoder(50, kernel_layout="HWIO").apply)(variables, x)
    for k, (f, r) in enumerate(zip(feats, ref)):
        r = torch_nets.nhwc(r)
        assert f.shape == r.shape, k
        np.testing.assert_allclose(f, r, atol=1e-4 * max(1.0, float(np.abs(r).max())), err_msg=f"f{k}")


def test_bad_state_dict_lists_every_problem(torch_folder, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("encoder.pth", "pose_encoder.pth", "pose.pth"):
        (folder / name).write_bytes((torch_folder[0] / name).read_bytes())
    depth = torch.load(torch_folder[0] / "depth.pth", weights_only=True)
    del depth["decoder.3.conv.conv.bias"]
    depth["decoder.99.conv.weight"] = torch.zeros(1)
    depth["decoder.12.conv.weight"] = torch.zeros(1, 64, 5, 5)
    torch.save(depth, folder / "depth.pth")
    with pytest.raises(ValueError) as e:
        convert.load_monodepth2(folder)
    msg = str(e.value)
    assert "depth.pth" in msg
    assert "missing keys: decoder.3.conv.conv.bias" in msg
    assert "unexpected keys: decoder.99.conv.weight" in msg
    assert "decoder.12.conv.weight: file has (1, 64, 5, 5), expected (1, 64, 3, 3)" in msg

    (folder / "pose.pth").unlink()
    with pytest.raises(ValueError, match="missing pose.pth"):
        convert.load_monodepth2(folder)


def test_convert_weights_cli_round_trip(torch_folder, converted, tmp_path, capsys):
    out = tmp_path / "converted"
    assert cli.main(["convert-weights", "--monodepth2", str(torch_folder[0]), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"num_layers": 18, "height": H, "width": W, "has_pose": True, "kernel_layout": "HWIO",
                    "use_stereo": False}
    for name in ("depth", "pose"):
        loaded = convert.load_variables(out / f"{name}.msgpack")
        assert jax.tree.structure(loaded) == jax.tree.structure(converted[name])
        jax.tree.map(np.testing.assert_array_equal, loaded, converted[name])

    pth = tmp_path / "r18.pth"
    torch.save(torch_folder[1][2].encoder.state_dict(), pth)  # the 6-channel pose encoder
    msg = tmp_path / "enc.msgpack"
    assert cli.main(["convert-weights", "--torchvision", str(pth), "--num-layers", "18",
                     "--num-input-images", "2", "--out", str(msg)]) == 0
    loaded = convert.load_variables(msg)
    want = {c: converted["pose"][c]["encoder"] for c in ("params", "batch_stats")}
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    assert not list(tmp_path.glob("**/*.tmp"))  # no temp files left behind

    # a wrong depth is named, with the depth the file holds, exit status 2 (bad input, as predict,
    # eval, train); until 2026-12-07 ~2 kB of missing and unexpected keys; so is a Monodepth2 file
    assert cli.main(["convert-weights", "--torchvision", str(pth), "--num-layers", "34", "--out",
                     str(tmp_path / "x.msgpack")]) == 2
    assert f"{pth} holds a ResNet-18, not a ResNet-34: pass --num-layers 18" in capsys.readouterr().err
    for name in ("encoder.pth", "pose_encoder.pth", "depth.pth"):
        assert cli.main(["convert-weights", "--torchvision", str(torch_folder[0] / name), "--num-layers", "18",
                         "--out", str(tmp_path / "x.msgpack")]) == 2
        err = capsys.readouterr().err
        assert "not a torchvision" in err and "convert its model folder with --monodepth2 DIR" in err, err
        assert "missing keys" not in err
    assert not (tmp_path / "x.msgpack").exists()
    # converting a folder without a pose net over that conversion leaves no stale pose.msgpack
    depth_only = tmp_path / "depth_only"
    depth_only.mkdir()
    for name in ("encoder.pth", "depth.pth"):
        shutil.copy(torch_folder[0] / name, depth_only / name)
    assert cli.main(["convert-weights", "--monodepth2", str(depth_only), "--out", str(out)]) == 0
    assert json.loads((out / "meta.json").read_text())["has_pose"] is False
    assert not (out / "pose.msgpack").exists()
    # --out of the wrong kind, before anything is read: a folder for one file, a file for a folder
    assert cli.main(["convert-weights", "--torchvision", str(pth), "--num-layers", "18", "--out",
                     str(tmp_path)]) == 2
    assert "is a folder; --torchvision writes one .msgpack file" in capsys.readouterr().err
    assert cli.main(["convert-weights", "--monodepth2", str(torch_folder[0]), "--out", str(msg)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    # --out below a file: named, exit 2, before the weights are read (a NotADirectoryError
    # traceback, exit 1, from the folder made after the conversion)
    for flag, src in (("--monodepth2", torch_folder[0]), ("--torchvision", pth)):
        args = ["convert-weights", flag, str(src), "--out", str(msg / "sub")] + (
            ["--num-layers", "18"] if flag == "--torchvision" else [])
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert f"--out {msg / 'sub'}: cannot be made: {msg} is a file" in err and "Traceback" not in err


def test_a_failed_write_is_one_line_and_an_incomplete_folder_is_named(torch_folder, tmp_path, capsys,
                                                                       monkeypatch):
    """A full disk while convert-weights writes: one line naming the file (was an OSError traceback,
    exit 1); a re-conversion that fails leaves the folder without meta.json, which `--monodepth2`
    names as an incomplete conversion (said "missing encoder.pth, depth.pth" of a converted folder)."""
    from xdistill_jax import inference

    out = tmp_path / "converted"
    assert cli.main(["convert-weights", "--monodepth2", str(torch_folder[0]), "--out", str(out)]) == 0
    capsys.readouterr()
    save = convert.save_variables

    def full_disk_at_pose(path, variables):
        if str(path).endswith("pose.msgpack"):
            raise OSError(28, "No space left on device")
        save(path, variables)

    monkeypatch.setattr(convert, "save_variables", full_disk_at_pose)
    assert cli.main(["convert-weights", "--monodepth2", str(torch_folder[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"writing {out / 'pose.msgpack'} failed: No space left on device; {out} holds no complete " \
           "conversion (no meta.json)" in err, err
    assert not (out / "meta.json").exists()
    with pytest.raises(ValueError, match=r"holds depth.msgpack but no meta.json.*an incomplete conversion"):
        inference.load_monodepth2_model(out)

    pth = tmp_path / "r18.pth"
    torch.save(torch_folder[1][0].encoder.state_dict(), pth)
    def full_disk(path, variables):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "save_variables", full_disk)
    assert cli.main(["convert-weights", "--torchvision", str(pth), "--num-layers", "18", "--out",
                     str(tmp_path / "enc.msgpack")]) == 2
    err = capsys.readouterr().err
    assert f"writing {tmp_path / 'enc.msgpack'} failed: No space left on device; nothing was written" in err, err


def test_a_converted_folder_is_read_by_eval_and_predict_without_torch(torch_folder, converted, tmp_path,
                                                                      monkeypatch, capsys):
    """What `convert-weights --monodepth2` wrote was read by nothing (eval/predict --monodepth2 asked
    for encoder.pth), and `eval --monodepth2` without torch was a traceback (predict: exit 2)."""
    from PIL import Image

    from xdistill_jax import inference

    out = tmp_path / "converted"
    assert cli.main(["convert-weights", "--monodepth2", str(torch_folder[0]), "--out", str(out)]) == 0
    monkeypatch.setitem(sys.modules, "torch", None)  # as without the torch extra: `import torch` fails
    model = inference.load_monodepth2_model(out)
    assert (model.height, model.width, model.min_depth, model.max_depth) == (H, W, 0.1, 100.0)
    for got, want in ((model.depth_variables, converted["depth"]), (model.pose_variables, converted["pose"])):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), np.uint8)).save(image)
    assert cli.main(["predict", "--monodepth2", str(out), "--no-progress", "--out", str(tmp_path / "pred"),
                     str(image)]) == 0
    assert np.load(tmp_path / "pred" / "a_depth.npy").shape == (40, 100)
    assert "use_stereo" not in capsys.readouterr().err  # a monocular model: no note
    # stereo-trained weights (encoder.pth's use_stereo, kept in meta.json): predict says what
    # --scale gives metres (use_stereo was read and saved, and used by nothing)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(dict(meta, use_stereo=True)))
    assert inference.load_monodepth2_model(out).use_stereo is True
    assert cli.main(["predict", "--monodepth2", str(out), "--no-progress", "--out", str(tmp_path / "pred_st"),
                     str(image)]) == 0
    assert "trained with stereo pairs (encoder.pth: use_stereo=True): --scale 5.4 writes its depth in metres" \
        in capsys.readouterr().err
    (out / "meta.json").write_text(json.dumps(meta))
    # the .pth folder without torch: exit 2 saying what to do, no traceback
    for verb in (["eval", "--monodepth2", str(torch_folder[0]), "--data", str(tmp_path), "--gt", str(tmp_path / "g"),
                  "--out", str(tmp_path / "ev")],
                 ["predict", "--monodepth2", str(torch_folder[0]), "--out", str(tmp_path / "p2"), str(image)]):
        capsys.readouterr()
        assert cli.main(verb) == 2
        err = capsys.readouterr().err
        assert "needs PyTorch" in err and "convert-weights --monodepth2" in err and "Traceback" not in err
    # a converted folder that does not fit: every problem named with its file
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(dict(meta, num_layers=20, height=100)))
    with pytest.raises(ValueError, match=r"meta\.json: num_layers = 20, expected one of \[18, 34, 50\]\n.*"
                                         r"meta\.json: height = 100, expected a positive multiple of 32"):
        inference.load_monodepth2_model(out)
    (out / "meta.json").write_text(json.dumps(meta))
    pose = convert.load_variables(out / "pose.msgpack")
    del pose["params"]["decoder"]["squeeze"]
    convert.save_variables(out / "pose.msgpack", pose)
    with pytest.raises(ValueError, match=r"pose\.msgpack: missing keys: params/decoder/squeeze/bias, "
                                         r"params/decoder/squeeze/kernel"):
        inference.load_monodepth2_model(out)


def test_an_encoder_file_of_no_resnet_or_a_bad_size_is_named(torch_folder, tmp_path):
    """Which file and why: its keys lack 'encoder.' (torchvision's), or are the decoder's (the files
    swapped); a training size that is no multiple of 32 (was found by the network after loading)."""
    state = torch.load(torch_folder[0] / "encoder.pth", weights_only=True)
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(torch_folder[0] / "depth.pth", folder / "depth.pth")
    enc = folder / "encoder.pth"
    torchvision_named = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state.items()}
    for bad, hint in ((torchvision_named, "its keys lack the 'encoder.' prefix: a torchvision state dict"),
                      (torch.load(torch_folder[0] / "depth.pth", weights_only=True), "depth decoder's: encoder.pth "
                                                                                   "and depth.pth swapped"),
                      ({}, "the file holds no weights")):
        torch.save(bad, enc)
        with pytest.raises(ValueError, match=re.escape(f"{enc}: state dict has ResNet blocks per stage") + ".*"
                                             + re.escape(hint)):
            convert.load_monodepth2(folder)
    torch.save(dict(state, height=100), enc)
    with pytest.raises(ValueError, match=re.escape(f"{enc}: entry 'height' = 100: the training size must be a "
                                                   "positive multiple of 32")):
        convert.load_monodepth2(folder)


class _Payload:
    """An object whose unpickling would run code: it creates `marker` when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_arbitrary_object_is_refused_without_running_it(tmp_path):
    import torch

    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=rf"{path}: cannot read as a PyTorch state dict"):
        convert.load_torchvision_resnet(path, 18)
    (tmp_path / "md2").mkdir()
    for name in ("encoder.pth", "depth.pth", "pose_encoder.pth", "pose.pth"):
        torch.save(_Payload(marker), tmp_path / "md2" / name)
    with pytest.raises(ValueError, match=r"\.pth: cannot read as a PyTorch state dict"):
        convert.load_monodepth2(tmp_path / "md2")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickle does run it
    assert marker.exists()
