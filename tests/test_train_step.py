"""The X-Distill objective and the jitted data-parallel train step (tiny ResNet-18 at 32x96)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_fixtures import make_batch, tiny_config
from xdistill_jax import distillation, geometry, losses, objective, train
from xdistill_jax.models.translator import translate
from xdistill_jax.objective import Networks

H, W, B = 32, 96, 4


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def runs_by_device_count():
    """3 train steps (distillation on, the paper's Adam) on meshes of 1, 2 and 4 devices, same
    global batches. The tie-break noise is drawn with a sharding-invariant threefry key (with
    the rbg key drawn directly, auto-mask choices differed and weights by ~1e-4)."""
    out = {}
    for n in (1, 2, 4):
        config = tiny_config(distill_weight=0.1, **{"mesh.num_devices": n})
        nets = Networks.from_config(config)
        tx = train.make_optimizer(config, steps_per_epoch=100)
        mesh = train.make_mesh(config)
        state = train.create_train_state(nets, tx, mesh, jax.random.key(0))
        step = train.make_train_step(config, nets, tx, mesh)
        losses_, metrics = [], None
        for i in range(3):
            state, metrics = step(state, train.global_batch(make_batch(B, H, W, seed=i), mesh), jax.random.key(1))
            losses_.append(float(metrics["loss"]))
        out[n] = dict(losses=np.asarray(losses_), params=_flat(state.params),
                      batch_stats=_flat(state.batch_stats), step=int(state.step),
                      metrics={k: float(v) for k, v in metrics.items()},
                      sharding=state.params["depth"]["decoder"]["dispconv_0"]["kernel"].sharding)
    return out


# Device-count invariance (issue #5): 3 Adam steps on 1, 2 and 4 devices. Losses agree to 1e-5;
# every weight and BatchNorm statistic to PARAM_ATOL = 5e-5 on 2 and 4 devices (measured worst
# 4.6e-5, a pose-encoder weight), not issue #5's 1e-5. 4 devices used to drift up to 3e-4: the
# one-pass BatchNorm variance E[x^2]-E[x]^2 cancelled in float32, so first-step gradients
# differed by up to 6e-6 across device counts (22% of some pose-encoder gradients, 376 sign
# flips); with TorchBatchNorm's two-pass variance they differ by <= 2e-8 (31 flips). The rest is
# Adam: each coordinate is normalised by its own gradient scale (update ~ lr * g/|g| at first),
# so a reduction-order difference in a small gradient still moves a weight by a fraction of lr
# (1e-4), and in the deepest pose layers (BatchNorm over 12 values per channel at 32x96, batch 4)
# the next steps' gradients then differ by up to 3% relative.
PARAM_ATOL = 5e-5


def _worst(run, ref, prefix=""):
    return max((float(np.max(np.abs(run[k] - ref[k]))), k) for k in ref if k.startswith(prefix))


def test_same_result_on_1_2_4_devices(runs_by_device_count):
    ref = runs_by_device_count[1]
    assert ref["step"] == 3
    assert ref["losses"][2] < ref["losses"][0]  # three Adam steps on the same kind of data lower it
    for n in (2, 4):
        run = runs_by_device_count[n]
        np.testing.assert_allclose(run["losses"], ref["losses"], rtol=0, atol=1e-5)
        assert run["params"].keys() == ref["params"].keys()
        assert run["sharding"].is_fully_replicated
        # every weight and BatchNorm statistic
        assert _worst(run["params"], ref["params"])[0] <= PARAM_ATOL, (n, _worst(run["params"], ref["params"]))
        assert _worst(run["batch_stats"], ref["batch_stats"])[0] <= PARAM_ATOL


def test_step_metrics_and_translator_params(runs_by_device_count):
    m = runs_by_device_count[4]["metrics"]
    assert m["loss"] == pytest.approx(m["photometric_loss"] + 0.1 * m["distill_loss"], rel=1e-6)
    assert all(np.isfinite(v) for v in m.values())
    assert m["grad_norm"] > 0
    assert any(k.startswith("['translator']") for k in runs_by_device_count[4]["params"])


@pytest.fixture(scope="module")
def nets_and_vars():
    config = tiny_config(distill_weight=0.1)
    nets = Networks.from_config(config)
    params, batch_stats = jax.jit(lambda r: nets.init(r, H, W))(jax.random.key(3))
    return config, nets, params, batch_stats


def test_lambda_zero_is_exactly_monodepth2(nets_and_vars):
    config, nets, params, batch_stats = nets_and_vars
    config0 = tiny_config(distill_weight=0.0)
    nets0 = Networks.from_config(config0)
    assert nets0.translator is None
    params0 = {k: v for k, v in params.items() if k != "translator"}
    batch = {k: jnp.asarray(v) for k, v in make_batch(B, H, W, seed=5).items() if k != "teacher"}
    rng = jax.random.key(7)

    @jax.jit
    def both(p, bs, batch):
        total, (_, metrics) = objective.loss_fn(nets0, config0, p, bs, batch, rng, train=True)
        # the same network outputs, assembled by hand into monodepth2_loss
        color = batch["color"].astype(jnp.float32) / 255.0
        aug = batch["color_aug"].astype(jnp.float32) / 255.0
        disps, _ = nets0.depth.apply({"params": p["depth"], "batch_stats": bs["depth"]}, aug[:, 1],
                                     train=True, mutable=["batch_stats"])
        pose_vars = {"params": p["pose"], "batch_stats": bs["pose"]}
        (aa_m, t_m), upd = nets0.pose.apply(pose_vars, jnp.concatenate([aug[:, 0], aug[:, 1]], -1),
                                            train=True, mutable=["batch_stats"])
        (aa_p, t_p), _ = nets0.pose.apply({"params": p["pose"], **upd},
                                          jnp.concatenate([aug[:, 1], aug[:, 2]], -1),
                                          train=True, mutable=["batch_stats"])
        cam_T_cam = {-1: geometry.pose_from_axisangle(aa_m, t_m, invert=True),
                     1: geometry.pose_from_axisangle(aa_p, t_p, invert=False)}
        colors = {f: {0: color[:, i]} for i, f in enumerate((-1, 0, 1))}
        for s in (1, 2, 3):
            for i, f in enumerate((-1, 0, 1)):
                colors[f][s] = batch[f"color_s{s}"][:, i].astype(jnp.float32) / 255.0
        ref, _ = losses.monodepth2_loss(colors, disps, cam_T_cam, {s: batch["K"][:, s] for s in range(4)},
                                        {s: batch["inv_K"][:, s] for s in range(4)},
                                        rng=objective.sharding_invariant_key(rng))
        return total, ref, metrics

    total, ref, metrics = both(params0, batch_stats, batch)
    assert float(total) == float(ref)
    assert "distill_loss" not in metrics and "translator_logits" not in metrics


def test_distillation_term_is_lambda_times_distillation_loss(nets_and_vars):
    config, nets, params, batch_stats = nets_and_vars
    batch = {k: jnp.asarray(v) for k, v in make_batch(B, H, W, seed=6).items()}

    @jax.jit
    def run(p, bs, batch):
        total, (_, m) = objective.loss_fn(nets, config, p, bs, batch, jax.random.key(0), train=False)
        disps = nets.depth.apply({"params": p["depth"], "batch_stats": bs["depth"]},
                                 batch["color_aug"][:, 1].astype(jnp.float32) / 255.0, train=False)
        d = distillation.distillation_loss(translate(p["translator"], disps, module=nets.translator),
                                           batch["teacher"], mode="hard")
        return total, m["photometric_loss"], d

    total, photometric, d = run(params, batch_stats, batch)
    np.testing.assert_allclose(float(total), float(photometric) + 0.1 * float(d), rtol=1e-6)


def test_gradients_finite_and_nonzero_for_every_parameter(nets_and_vars):
    config, nets, params, batch_stats = nets_and_vars
    batch = {k: jnp.asarray(v) for k, v in make_batch(B, H, W, seed=8).items()}
    grad = jax.jit(jax.grad(lambda p: objective.loss_fn(nets, config, p, batch_stats, batch,
                                                        jax.random.key(0), train=True)[0]))(params)
    flat = _flat(grad)
    assert {k.split("'")[1] for k in flat} == {"depth", "pose", "translator"}
    bad = [k for k, g in flat.items() if not np.all(np.isfinite(g))]
    assert not bad, bad
    zero = [k for k, g in flat.items() if not np.any(g != 0)]
    assert not zero, zero


def test_lr_schedule_drops_after_14_epochs_like_the_original_code():
    config = tiny_config()
    config.optim.lr_drop_epochs = (14,)
    schedule = train.lr_schedule(config, steps_per_epoch=3317)
    assert float(schedule(14 * 3317 - 1)) == pytest.approx(1e-4)
    assert float(schedule(14 * 3317)) == pytest.approx(1e-5)
    assert train.total_steps(config, 3317) == 2  # num_steps overrides epochs
    config.optim.num_steps = -1
    assert train.total_steps(config, 3317) == 66340


def test_two_processes_train_in_lockstep_like_one(runs_by_device_count, tmp_path):
    """Two `jax.distributed` CPU processes (one device each, loopback), each feeding its half of
    the global batch, end with the parameters of the 2-device single-process run."""
    import pathlib
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = pathlib.Path(__file__).with_name("distributed_worker.py")
    out = tmp_path / "params.npz"
    procs = [subprocess.Popen([sys.executable, str(worker), str(out), str(i), "2", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    lines = [next(line for line in log.splitlines() if line.startswith("done")) for log in logs]
    assert lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2]  # same losses on both processes
    ref = runs_by_device_count[2]
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    worst = max(float(np.max(np.abs(got[k] - ref["params"][k]))) for k in ref["params"])
    assert worst <= PARAM_ATOL, worst


def test_pretrained_encoder_init(tmp_path):
    """config.model.init: the msgpack encoder goes into the depth encoder as is and into the
    two-image pose encoder with conv1 repeated over both images and halved (Monodepth2)."""
    from xdistill_jax.convert import save_variables
    from xdistill_jax.models.resnet import ResNetEncoder

    enc = ResNetEncoder(18, 1).init(jax.random.key(5), jnp.zeros((1, 64, 64, 3)), train=False)
    enc = jax.tree.map(lambda x: np.asarray(x) + 0.5, enc)  # distinct from any scratch init
    path = tmp_path / "resnet18.msgpack"
    save_variables(path, enc)
    config = tiny_config(distill_weight=0.0, **{"model.init": str(path)})
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    state = train.create_train_state(nets, tx, mesh, jax.random.key(0), train.load_pretrained_encoders(config))
    got = _flat(state.params["depth"]["encoder"])
    want = _flat(enc["params"])
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    np.testing.assert_array_equal(state.batch_stats["depth"]["encoder"]["bn1"]["var"], enc["batch_stats"]["bn1"]["var"])
    pose_conv1 = np.asarray(state.params["pose"]["encoder"]["conv1"]["kernel"])
    np.testing.assert_allclose(pose_conv1, np.concatenate([enc["params"]["conv1"]["kernel"]] * 2, axis=2) / 2)
    np.testing.assert_array_equal(state.params["pose"]["encoder"]["layer4_1"]["conv2"]["kernel"],
                                  enc["params"]["layer4_1"]["conv2"]["kernel"])
    bad = tiny_config(distill_weight=0.0, **{"model.init": str(path), "model.num_layers": 34})
    with pytest.raises(ValueError, match="pretrained depth encoder"):
        train.create_train_state(Networks.from_config(bad), tx, mesh, jax.random.key(0),
                                 train.load_pretrained_encoders(bad))
