"""Small configs and batches shared by the training tests (no test functions here)."""

import os
import pathlib

import numpy as np

from xdistill_jax import config_utils
from xdistill_jax.config_defaults import base_config


SUBPROCESS_SITE = pathlib.Path(__file__).with_name("subprocess_site")


def multiprocess_env(env: dict) -> dict:
    """`env` for one process of a multi-process launch on the CPU: its PYTHONPATH led by
    `subprocess_site/`, whose sitecustomize keys the compilation cache's entries the same on every
    process (process 1 then reads the programs process 0 wrote instead of compiling them)."""
    paths = [str(SUBPROCESS_SITE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(paths))


def abstract_state_of(workdir):
    """The abstract train state of `workdir`'s saved config, on one device (to restore its
    checkpoints with `Checkpointer.restore`)."""
    from xdistill_jax import train
    from xdistill_jax.objective import Networks

    config = config_utils.load_config(workdir)
    config.mesh.num_devices = 1
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=3)
    return train.abstract_train_state(nets, tx, train.make_mesh(config))[0]


def restored_state(workdir, step):
    """`workdir`'s checkpoint of `step` as {keystr: numpy array} over (params, batch_stats,
    opt_state), restored on one device."""
    import jax

    from xdistill_jax.checkpoints import Checkpointer

    state, _, got = Checkpointer(workdir / "checkpoints").restore(abstract_state_of(workdir), step=step)
    assert got == step
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path((state.params, state.batch_stats, state.opt_state))[0]}


K_NORM = np.array([[0.58, 0, 0.5, 0], [0, 1.92, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)


def tiny_config(distill_weight: float = 0.1, **overrides):
    """ResNet-18 at 32x96, batch 4, the settings the tests compile once."""
    config = base_config()
    config.data.height, config.data.width = 32, 96
    config.optim.batch_size = 4
    config.optim.num_steps = 2
    config.distill.weight = float(distill_weight)
    config.run.log_every = config.run.ckpt_every = config.run.val_every = config.run.image_every = 1
    config.run.keep = 3
    config.run.async_checkpoints = False
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    config = config_utils.apply_overrides(config, args)
    config_utils.validate(config)
    return config


def make_batch(batch: int, height: int, width: int, groups: int = 7, seed: int = 0) -> dict:
    """A batch in the loader's format (contracts.md) with random images and teacher logits."""
    r = np.random.default_rng(seed)
    out = {"color": r.integers(0, 256, (batch, 3, height, width, 3), dtype=np.uint8)}
    out["color_aug"] = np.clip(out["color"].astype(np.int16) + 10, 0, 255).astype(np.uint8)
    for s in (1, 2, 3):
        out[f"color_s{s}"] = r.integers(0, 256, (batch, 3, height >> s, width >> s, 3), dtype=np.uint8)
    Ks, inv_Ks = [], []
    for s in range(4):
        K = K_NORM.copy()
        K[0] *= width // 2**s
        K[1] *= height // 2**s
        Ks.append(K)
        inv_Ks.append(np.linalg.pinv(K))
    out["K"] = np.broadcast_to(np.stack(Ks), (batch, 4, 4, 4)).copy()
    out["inv_K"] = np.broadcast_to(np.stack(inv_Ks), (batch, 4, 4, 4)).astype(np.float32)
    out["index"] = np.arange(batch, dtype=np.int32)
    out["teacher"] = r.normal(size=(batch, height, width, groups)).astype(np.float16)
    return out


def records(n: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """In-memory stand-in for a prepared TFDS split (what `open_split` returns per index)."""
    r = np.random.default_rng(seed)
    return [dict(id=f"2011_09_26/2011_09_26_drive_0001_sync {i} l".encode(),
                 image_m1=r.integers(0, 256, (height, width, 3), dtype=np.uint8),
                 image_0=r.integers(0, 256, (height, width, 3), dtype=np.uint8),
                 image_p1=r.integers(0, 256, (height, width, 3), dtype=np.uint8),
                 K=K_NORM, index=i) for i in range(n)]


class FakeTeacher:
    """The teacher-store interface over `records`: (id, (h,w,G) float16 logits)."""

    def __init__(self, recs, height, width, groups=7):
        self.recs, self.shape = recs, (height, width, groups)

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        logits = np.random.default_rng(1000 + i).normal(size=self.shape).astype(np.float16)
        return self.recs[i]["id"].decode(), logits
