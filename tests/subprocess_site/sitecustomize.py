"""Loaded at start-up by the processes of the suite's multi-process launches on the CPU (their
PYTHONPATH names this folder: `train_fixtures.multiprocess_env`; `tests/test_multiprocess_train.py`,
`tests/test_train_step.py`).

JAX keys a persistent-cache entry partly by the devices' topology, and on the CPU each process
of a multi-process run describes a topology of its own: process 1's key for the same program
differs from process 0's, and only process 0 writes entries (jax 0.10: `compiler._cache_write`).
So process 1 compiled every program anew at each launch, the cache warm or not (the train step
of the smoke config: 56-67 s against process 0's 6-9 s, 2026-12-07). Here CPU devices are keyed
by their platform and ids, the same on every process, and process 1 reads what process 0 wrote.
TPU and GPU keys are left as they are (their topology is the pod's, the same on every host).
Tests only: a real run's processes are on TPUs or GPUs.

The change is made when JAX imports `jax._src.cache_key` (an import hook), not here: importing
JAX at start-up would read its environment (JAX_PLATFORMS, JAX_DEFAULT_PRNG_IMPL) before the
process sets it. Where JAX no longer has the private function, nothing is changed (the launches
compile as before).
"""

import importlib.abc
import importlib.util
import sys

_MODULE = "jax._src.cache_key"


def _key_cpu_devices_by_id(cache_key) -> None:
    by_topology = getattr(cache_key, "_hash_accelerator_config", None)
    if by_topology is None:
        return

    def _hash_accelerator_config(hash_obj, accelerators, *args, **kwargs):
        devices = list(accelerators.flat)
        if devices and all(d.platform == "cpu" for d in devices):
            for d in devices:
                hash_obj.update(f"cpu:{d.id};".encode())
            return
        by_topology(hash_obj, accelerators, *args, **kwargs)

    cache_key._hash_accelerator_config = _hash_accelerator_config


class _OnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of `jax._src.cache_key` to change the module once
    it has run."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _key_cpu_devices_by_id(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OnImport())  # site runs this before anything imports JAX
