"""Persistent XLA compilation cache for the entry points (`xdistill train`, `bench`, `demo`).

A warm cache turns the train step's compile (tens of seconds on a GPU) into a file read. The
directory is, in order of precedence: the `path` argument (e.g. a `--compilation-cache` flag),
the `XDISTILL_COMPILATION_CACHE` environment variable, JAX's own `JAX_COMPILATION_CACHE_DIR`,
then `~/.cache/xdistill_jax/jax_cache`. The value "off" (or "none", "") disables it.

Only programs that took at least `min_compile_secs` to compile are written (tiny jitted helpers
would otherwise litter the cache). Call before the first compilation: JAX reads the setting
when it first uses the cache.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "XDISTILL_COMPILATION_CACHE"
DEFAULT_DIR = pathlib.Path.home() / ".cache" / "xdistill_jax" / "jax_cache"
_OFF = ("", "off", "none", "0", "false")


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The directory the cache would use (None when disabled); see the module docstring."""
    for value in (path, os.environ.get(ENV_VAR), os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is not None:
            text = str(value).strip()
            return None if text.lower() in _OFF else pathlib.Path(text).expanduser()
    return DEFAULT_DIR


def enable_compilation_cache(path: str | os.PathLike | None = None,
                             min_compile_secs: float = 1.0) -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at `cache_dir(path)`; returns it (None: off).

    Raises ValueError naming the directory when it cannot be created.
    """
    import jax

    directory = cache_dir(path)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache directory {directory}: cannot create it ({e}); "
                         f"set {ENV_VAR}=off to run without a cache") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
