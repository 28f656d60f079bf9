"""Persistent XLA compilation cache for the entry points (`xdistill train`, `bench`, `demo`).

A warm cache turns the train step's compile (tens of seconds on a GPU) into a file read. The
directory is, in order of precedence: the `path` argument (e.g. a `--compilation-cache` flag),
the `XDISTILL_COMPILATION_CACHE` environment variable, JAX's own `JAX_COMPILATION_CACHE_DIR`,
then `~/.cache/xdistill_jax/jax_cache`. The value "off" (or "none", "") disables it.

Only programs that took at least `min_compile_secs` to compile are written (tiny jitted helpers
would otherwise litter the cache). Call before the first compilation: JAX reads the setting
when it first uses the cache.

Damaged entries (`WholeEntryCache`). JAX writes an entry in place and never rewrites a key that
has a file: a process killed while writing one (a preempted job, a timeout) left a truncated
entry that every later run failed to read, warned about and compiled anew, a cold start on every
start; and a process reading an entry while another wrote it read a partial one. Here each entry
is written to a temporary file in the same directory and renamed into place (readers see the
whole entry or none), and a damaged entry (one that does not decompress) is replaced, with a
warning naming its file, when JAX, having failed to read it, writes the program it compiled:
one more compile, then the entry is read again. A temporary file a killed writer left (between
its write and its rename) is removed by the next write into the directory once it is an hour
old (`STALE_TMP_S`; each was a whole executable, kept for good until 2026-12-07).
"""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
import time
import warnings

logger = logging.getLogger(__name__)

ENV_VAR = "XDISTILL_COMPILATION_CACHE"
DEFAULT_DIR = pathlib.Path.home() / ".cache" / "xdistill_jax" / "jax_cache"
_OFF = ("", "off", "none", "0", "false")
STALE_TMP_S = 3600.0  # a temporary entry file this old is a killed writer's (a write takes seconds)


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The directory the cache would use (None when disabled); see the module docstring."""
    from xdistill_jax import local_paths

    for where, value in (("--compilation-cache", path), (ENV_VAR, os.environ.get(ENV_VAR)),
                         ("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR"))):
        if value is not None:
            text = str(value).strip()
            local_paths.require_local(text, where)  # pathlib would make gs://b/c the local gs:/b/c
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
    install_whole_entry_cache()
    return directory


class WholeEntryCache:
    """JAX's file cache (`base`, an `LRUCache`) with entries written whole, and a damaged entry
    replaced by the next write of its key (the module docstring). Reads are JAX's own: the check
    costs nothing on a hit, only on the rare write of a key whose file exists (JAX writes a key
    after a miss, or after it failed to read the entry). Writes go through `base` where this
    cannot rename a temporary file into place: a cache with a size limit (JAX's eviction keeps
    its own files and lock) or on a remote filesystem."""

    def __init__(self, base, suffix: str, decompress):
        self._base = base
        self._suffix = suffix
        self._decompress = decompress

    @property
    def _path(self):  # JAX logs it (`reset_cache`)
        return self._base._path

    def entry_path(self, key: str) -> pathlib.Path:
        return pathlib.Path(str(self._base._path)) / f"{key}{self._suffix}"

    def _local(self) -> bool:
        return "://" not in str(self._base._path) or str(self._base._path).startswith("file://")

    def damage(self, path: pathlib.Path) -> str | None:
        """Why the entry at `path` cannot be read (None: it is whole)."""
        try:
            program = self._decompress(path.read_bytes())
        except Exception as e:  # zlib.error, zstd's errors: any failure to decompress
            return f"{type(e).__name__}: {e}"
        return None if len(program) >= 4 else "shorter than its 4-byte header"

    def get(self, key: str):
        return self._base.get(key)

    def put(self, key: str, value: bytes) -> None:
        if not self._local():
            self._base.put(key, value)
            return
        path = self.entry_path(key)
        self._remove_stale_tmp(path.parent)
        if path.exists():
            why = self.damage(path)
            if why is None:
                return  # JAX's rule: a whole entry is never rewritten
            warnings.warn(f"compilation cache entry {path} was damaged ({why}); written anew",
                          RuntimeWarning, stacklevel=2)
        if getattr(self._base, "eviction_enabled", True):  # JAX's write keeps its eviction files
            path.unlink(missing_ok=True)  # (it skips a key that has a file)
            self._base.put(key, value)
            return
        # a name of this process's own, outside JAX's "*-cache" pattern; mode 0o666 less the
        # umask, as JAX's own writes
        tmp = path.parent / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)  # over a damaged entry too
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _remove_stale_tmp(directory: pathlib.Path) -> None:
        """Remove the temporary entry files (`.KEY.PID.HEX.tmp`) older than STALE_TMP_S."""
        now = time.time()
        for tmp in directory.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
                    logger.info("removed %s, a compilation cache entry a killed process left half-written", tmp)
            except OSError:  # gone meanwhile (another process's sweep), or not ours to remove
                pass


def install_whole_entry_cache() -> bool:
    """Make JAX's persistent compilation cache a `WholeEntryCache` from now on (also when JAX
    creates it later, lazily, and after `reset_cache`). Returns False where this JAX lacks the
    internals it hooks (`jax._src.compilation_cache.get_file_cache`, `decompress_executable`,
    `jax._src.lru_cache._CACHE_SUFFIX`): the cache then works as JAX's own."""
    try:
        from jax._src import compilation_cache as jcc
        from jax._src import lru_cache

        get_file_cache = jcc.get_file_cache
        decompress, suffix = jcc.decompress_executable, lru_cache._CACHE_SUFFIX
    except (ImportError, AttributeError) as e:
        logger.info("compilation cache: entries written as JAX writes them (%s)", e)
        return False
    if getattr(get_file_cache, "_xdistill_whole_entries", False):
        wrap = get_file_cache
    else:
        def wrap(path, *args, **kwargs):
            made = get_file_cache(path, *args, **kwargs)
            if made is None:
                return None
            cache, where = made
            return WholeEntryCache(cache, suffix, decompress), where

        wrap._xdistill_whole_entries = True
        jcc.get_file_cache = wrap
    current = getattr(jcc, "_cache", None)
    if current is not None and not isinstance(current, WholeEntryCache):
        jcc._cache = WholeEntryCache(current, suffix, decompress)
    return True
