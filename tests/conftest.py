"""Test-session setup. Runs before any test module imports jax.

- 4 fake CPU devices, so sharding tests can build a Mesh(("data",)) of 1, 2 or 4 devices.
- rbg PRNG (cheaper on CPU), CPU platform unless the caller chose another.
- a persistent compilation cache shared by the test processes (and subprocesses they start),
  its entries written whole (`compilation_cache.WholeEntryCache`): one process never reads
  another's half-written entry.
- `-n auto` (setup.cfg's addopts, pytest-xdist): one test process per CPU core this process may
  use (its affinity or container CPU quota), at most 4 and one per 10 GB of memory; each test file runs whole in one of them
  (`--dist loadfile`), so a module's compiled fixtures are built once.
"""

import gc
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
_cache = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "xdistill_jax" / "jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from xdistill_jax.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache(_cache, min_compile_secs=0.5)  # entries written whole, as the CLI's

DATA_DIR = pathlib.Path(__file__).parent / "data"


MAX_WORKERS = 4
GB_PER_WORKER = 10  # a test process peaked at 9.9 GB resident before the caches were cleared
# after each module, 7.9 GB after (2 processes, 2026-12-06; the peak is test_train_step's)


def pytest_xdist_auto_num_workers(config):
    """How many test processes `-n auto` starts (PYTEST_XDIST_AUTO_NUM_WORKERS, if set, decides:
    None passes the choice to pytest-xdist's own hook)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from xdistill_jax.input_pipeline import available_cores  # affinity and container CPU quota

    try:
        by_memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 // GB_PER_WORKER)
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        by_memory = 1
    return max(1, min(available_cores(), MAX_WORKERS, by_memory))


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches_after_each_module():
    """Drops JAX's compiled-function caches when a test module is done, so that a test process
    holds one module's executables instead of every module's so far (a process that ran
    test_models, test_losses, test_translator and test_conv_channels peaked at 4.4 GB resident
    without this, 2.4 GB with it, in the same time). The persistent compilation cache still
    serves a function that a later module compiles again."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def ref():
    """Monodepth2's reference numbers (tests/data/monodepth2_ref.npz, NCHW as monodepth2 holds
    them), loaded once for every test module that compares against them."""
    with np.load(DATA_DIR / "monodepth2_ref.npz") as z:
        return {k: z[k] for k in z.files}
