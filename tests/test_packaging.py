"""setup.cfg: the accelerator extras install JAX's GPU / TPU builds in the core's jax range."""

import configparser
import pathlib
import re

SETUP_CFG = pathlib.Path(__file__).resolve().parent.parent / "setup.cfg"


def _requirements(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_accelerator_extras_take_the_cores_jax_range():
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    core = [r for r in _requirements(cfg["options"]["install_requires"]) if re.match(r"jax[<>=!~]", r)]
    assert len(core) == 1, core
    spec = core[0][len("jax"):]
    extras = cfg["options.extras_require"]
    for extra in ("cuda12", "cuda13", "tpu"):
        assert _requirements(extras[extra]) == [f"jax[{extra}]{spec}"], (extra, extras[extra])
