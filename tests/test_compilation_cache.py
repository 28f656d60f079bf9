"""The persistent compilation cache's entries: written whole, a damaged one replaced
(`compilation_cache.WholeEntryCache`)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zlib

import pytest
from jax._src.lru_cache import LRUCache

from xdistill_jax import compilation_cache
from xdistill_jax.compilation_cache import WholeEntryCache

ENTRY = zlib.compress(b"\x00\x00\x00\x07" + b"a serialized program" * 50)  # 4-byte time, program


def _cache(directory: pathlib.Path, max_size: int = -1) -> WholeEntryCache:
    return WholeEntryCache(LRUCache(str(directory), max_size=max_size), "-cache", zlib.decompress)


def test_an_entry_appears_only_whole_and_is_never_rewritten(tmp_path, monkeypatch):
    cache = _cache(tmp_path)
    path = tmp_path / "k1-cache"
    seen = []
    replace = os.replace

    def watching_replace(src, dst):  # the moment the entry gets its name
        seen.append((path.exists(), pathlib.Path(src).read_bytes() == ENTRY, pathlib.Path(src).name))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    cache.put("k1", ENTRY)
    assert len(seen) == 1
    existed, whole, tmp_name = seen[0]
    assert not existed and whole  # no file under the entry's name until all of it is written
    assert tmp_name.startswith(".k1.") and not tmp_name.endswith("-cache")  # outside JAX's pattern
    assert path.read_bytes() == ENTRY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1-cache"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as JAX's own writes
    cache.put("k1", zlib.compress(b"\x00\x00\x00\x01other"))  # JAX's rule: never rewritten
    assert path.read_bytes() == ENTRY and len(seen) == 1
    assert cache.get("k1") == ENTRY
    assert cache.get("k2") is None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("damage", ["truncated", "not compressed", "no header"])
def test_a_damaged_entry_is_replaced_with_a_warning_naming_it(tmp_path, damage):
    data = {"truncated": ENTRY[:len(ENTRY) // 2], "not compressed": b"\x00\x00\x00\x07program",
            "no header": zlib.compress(b"\x00\x07")}[damage]
    path = tmp_path / "k-cache"
    path.write_bytes(data)  # as JAX's in-place write leaves it when killed (or any damage)
    cache = _cache(tmp_path)
    assert cache.get("k") == data  # reads are JAX's: it fails to load it and compiles anew
    with pytest.warns(RuntimeWarning, match=f"compilation cache entry {path} was damaged"):
        cache.put("k", ENTRY)  # then writes the program it compiled
    assert path.read_bytes() == ENTRY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k-cache"]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    cache = _cache(tmp_path)

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        cache.put("k", ENTRY)
    assert list(tmp_path.iterdir()) == []


def test_a_size_limited_cache_writes_through_jax(tmp_path):
    """With a size limit JAX keeps its own files (an access-time file per entry) and lock: the
    write goes through it; a damaged entry is still replaced."""
    pytest.importorskip("filelock")  # JAX's size limit needs it (not a dependency of this project)
    cache = _cache(tmp_path, max_size=10**6)
    cache.put("k", ENTRY)
    assert (tmp_path / "k-cache").read_bytes() == ENTRY
    assert (tmp_path / "k-atime").exists()
    (tmp_path / "k-cache").write_bytes(ENTRY[:10])
    with pytest.warns(RuntimeWarning, match="damaged"):
        cache.put("k", ENTRY)
    assert (tmp_path / "k-cache").read_bytes() == ENTRY


_PROGRAM = """
import sys, warnings
import jax, jax.numpy as jnp
from xdistill_jax.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1], min_compile_secs=0)
warnings.simplefilter("always")
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print(float(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((32, 32))).sum()))
print("hits", events.count("/jax/compilation_cache/cache_hits"), file=sys.stderr)
print("writes", events.count("/jax/compilation_cache/cache_misses"), file=sys.stderr)
"""


def test_a_truncated_entry_is_compiled_once_more_then_read(tmp_path):
    """JAX alone keeps a truncated entry (it never rewrites a key that has a file) and compiles
    anew on every run; here the run that finds it writes it whole again, and the next run reads
    it."""
    directory = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run():
        proc = subprocess.run([sys.executable, "-c", _PROGRAM, str(directory)], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = run()
    assert "hits 0" in first.stderr and "writes 0" not in first.stderr
    (entry,) = directory.glob("jit__lambda-*-cache")
    whole = entry.read_bytes()
    entry.write_bytes(whole[:len(whole) // 3])
    second = run()
    assert f"compilation cache entry {entry} was damaged" in second.stderr
    assert second.stdout == first.stdout
    assert entry.read_bytes() == whole  # written whole again (the same program)
    assert "writes 0" not in second.stderr
    third = run()
    assert "damaged" not in third.stderr
    assert "writes 0" in third.stderr and "hits 0" not in third.stderr  # read, none compiled
    assert not list(directory.glob(".*.tmp"))


def test_enable_installs_it_for_the_cache_jax_creates(tmp_path, monkeypatch):
    from jax._src import compilation_cache as jcc

    made = jcc.get_file_cache(str(tmp_path))  # the hook conftest's enable_compilation_cache set
    assert isinstance(made[0], WholeEntryCache) and made[1] == str(tmp_path)
    assert compilation_cache.install_whole_entry_cache()  # a second install wraps nothing twice
    assert isinstance(jcc.get_file_cache(str(tmp_path))[0]._base, LRUCache)


@pytest.mark.parametrize("where", ["argument", compilation_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR"])
def test_a_url_cache_directory_is_refused_naming_where_it_came_from(where, monkeypatch, tmp_path):
    """pathlib would make gs://bucket/cache the local directory gs:/bucket/cache."""
    monkeypatch.chdir(tmp_path)
    for var in (compilation_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    if where != "argument":
        monkeypatch.setenv(where, "gs://bucket/cache")
    flag = "--compilation-cache" if where == "argument" else where
    with pytest.raises(ValueError, match=rf"{flag}=gs://bucket/cache: a URL \(gs://\)"):
        compilation_cache.cache_dir("gs://bucket/cache" if where == "argument" else None)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_file_is_removed_by_a_later_write_once_stale(tmp_path):
    """A process killed between its write and its rename leaves `.KEY.PID.HEX.tmp` (a whole
    executable for the train step), kept for good until 2026-12-07: the next write into the
    directory removes it once it is an hour old; a younger one (a live writer's) stays."""
    import time

    stale, live = tmp_path / ".k9.123.abcd1234.tmp", tmp_path / ".k8.456.ef567890.tmp"
    for f in (stale, live):
        f.write_bytes(ENTRY[:100])
    old = time.time() - compilation_cache.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    _cache(tmp_path).put("k1", ENTRY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k8.456.ef567890.tmp", "k1-cache"]
