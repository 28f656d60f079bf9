"""Loaded at start-up by the processes of the suite's multi-process `xdistill train` launches
(their PYTHONPATH names this folder; `tests/test_multiprocess_train.py`, `tests/test_train_step.py`).

JAX keys a persistent-cache entry partly by the devices' topology, and on the CPU each process
of a multi-process run describes a topology of its own: process 1's key for the same program
differs from process 0's, and only process 0 writes entries (jax 0.10: `compiler._cache_write`).
So process 1 compiled every program anew at each launch, the cache warm or not (the train step
of the smoke config: 56-67 s against process 0's 6-9 s, 2026-12-07). Here CPU devices are keyed
by their platform and ids, the same on every process, and process 1 reads what process 0 wrote.
TPU and GPU keys are left as they are (their topology is the pod's, the same on every host).
Tests only: a real run's processes are on TPUs or GPUs. Where JAX no longer has the private
function, nothing is changed (the launches compile as before).
"""

try:
    from jax._src import cache_key as _cache_key
except ImportError:  # no jax here: nothing to change
    _cache_key = None

if _cache_key is not None and hasattr(_cache_key, "_hash_accelerator_config"):
    _by_topology = _cache_key._hash_accelerator_config

    def _hash_accelerator_config(hash_obj, accelerators):
        devices = list(accelerators.flat)
        if devices and all(d.platform == "cpu" for d in devices):
            for d in devices:
                hash_obj.update(f"cpu:{d.id};".encode())
            return
        _by_topology(hash_obj, accelerators)

    _cache_key._hash_accelerator_config = _hash_accelerator_config
