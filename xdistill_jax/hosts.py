"""What the processes of a multi-host run (one `xdistill train` per host) agree on before training.

Each process checks its own settings, data and ground truth. One that fails alone would leave the
others waiting at their next collective until a timeout ends them with a runtime error that does
not say why (two CPU processes: a Gloo "DEADLINE_EXCEEDED" traceback after 30 s). `agree` makes
the check collective: every process learns which ones failed, each failing process raises its own
error, and the others raise a `SetupError` naming those processes.

`check_shared_directory`: the workdir must be one directory that every host sees (checkpoints are
written by several processes and read back by all; `config.json` and the metrics by process 0).
A local path on each host's own disk is not: each process would then resume from what its own
disk holds. Process 0 writes a probe file holding a token that every process is sent, into the
workdir or (a new run's) its deepest existing ancestor; every process reads it back (the file is
named by the token: never looked up before, so no filesystem cache of another host, NFS's or
gcsfuse's, holds a stale "absent" for it); the probe is removed whatever the outcome.

`StopTogether`: once the setup checks have passed, a failure is one process's own (a record of
its copy of the data that cannot be read, a disk error): it raises there alone, while the others
wait in the step's collectives. Two CPU processes, a damaged record on process 1: process 1
printed its error, then both waited out JAX's shutdown barrier and aborted (SIGABRT) after 5
minutes. Inside `StopTogether` each process watches the coordination service's key-value store
(a thread polling every 0.5 s); the failing process writes its error there, and every other
process prints it ("process 1 of 2 failed during training (...)") and ends at once with exit 2,
and the failing one ends with its own status without JAX's shutdown barrier
(`end_if_reported`). Process 0, which hosts the service, waits (10 s at most) until every other
process has seen the report before it ends. A stop is no failure: a process stopped by a signal
while it starts (SIGTERM, SIGINT: an exception that is not an `Exception`) reports "stopped", and
the others end with it with the stop's status, `EXIT_STOPPED` (75: rerun the same command), as it
does. Until 2026-12-07 the others ended with exit 2, and the stopped process returned 75 into
JAX's shutdown barrier and aborted (SIGABRT; after ~100 s where it was process 0).

With one process all of these are no-ops (beyond re-raising the process's own error).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import pathlib
import socket
import sys
import threading
import time

import jax
import numpy as np

PROBE_NAME = ".xdistill_shared_probe"
FAILED_KEY = "xdistill/failed"  # FAILED_KEY/<process>: that process's error, mid-run
SEEN_KEY = "xdistill/failure_seen"  # SEEN_KEY/<process>: that process has seen a report
STOPPED = "stopped: "  # a report's start when that process was stopped (a signal), not failed
EXIT_STOPPED = 75  # the status of a stopped run (training_loop.EXIT_PREEMPTED): rerun the same command

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """Another process of the run stopped before training; the message names it."""


def failed_processes(failed: bool) -> list[int]:
    """The indices of the processes that passed `failed=True` (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [0] if failed else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.asarray([bool(failed)]))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def any_process(flag: bool) -> bool:
    """Whether any process passed `flag=True` (a collective: every process calls it)."""
    return bool(failed_processes(flag))


def _processes(indices: list[int]) -> str:
    return f"process{'es' if len(indices) > 1 else ''} {', '.join(str(i) for i in indices)}"


def _others_message(failed: list[int], what: str) -> str:
    return (f"{_processes(failed)} of {jax.process_count()} failed {what} "
            f"({'their outputs say' if len(failed) > 1 else 'its output says'} why); process {jax.process_index()} "
            f"({socket.gethostname()}) stops with it, nothing written")


@contextlib.contextmanager
def agree(what: str):
    """Run the block on every process, then agree: a process whose block raised re-raises its
    error; the others raise `SetupError` if any process failed. The block must not itself use
    collectives (a failing process would skip them)."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
        error = e
    failed = failed_processes(error is not None)
    if error is not None:
        raise error
    if failed:
        raise SetupError(_others_message(failed, what))


def fingerprint_int(text: str) -> int:
    """A string's sha256 as a non-negative integer of 60 bits, for `check_same`; 0 for ""."""
    if not text:
        return 0
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _to_halves(values) -> np.ndarray:
    """Integers in [0, 2^62) as int32 pairs (high, low 31 bits): with jax's 64-bit mode off (the
    default) an int64 array crosses processes as int32, its high bits lost."""
    return np.asarray([[v >> 31, v & 0x7FFFFFFF] for v in map(int, values)], np.int32)


def _from_halves(halves: np.ndarray) -> np.ndarray:
    return (halves[..., 0].astype(np.int64) << 31) | halves[..., 1].astype(np.int64)


def check_same(values: dict[str, int], hint: str) -> None:
    """Raise SetupError on every process unless each of `values` (name -> int in [0, 2^62)) is the
    same on all of them; the message gives each differing value by process, then `hint`."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    halves = np.asarray(multihost_utils.process_allgather(_to_halves(values.values())))
    table = _from_halves(halves.reshape(jax.process_count(), len(values), 2))
    differ = []
    for j, name in enumerate(values):
        column = table[:, j]
        if np.any(column != column[0]):
            if "fingerprint" in name:
                differ.append(f"{name}: differs on {_processes([i for i in range(len(column)) if column[i] != column[0]])}"
                              " from process 0's")
            else:
                differ.append(f"{name}: " + ", ".join(f"process {i} {int(v)}" for i, v in enumerate(column)))
    if differ:
        raise SetupError(f"the processes disagree ({'; '.join(differ)}): {hint}")


def check_shared_directory(path: pathlib.Path, what: str = "workdir") -> None:
    """Raise SetupError on every process unless all of them see the same directory `path`.

    The probe goes into `path` if it exists on process 0, else into its deepest ancestor that does
    (a new run's workdir is made later): a directory the other processes may have looked up and
    found absent moments ago could still be cached as absent by their filesystem client (NFS,
    gcsfuse), which would fail the check on a shared filesystem. Nothing is created but the probe.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = pathlib.Path(path).absolute()
    chain = [path, *path.parents]
    up = next(i for i, p in enumerate(chain) if p.exists() or p == chain[-1])
    token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF  # int32: no 64-bit mode needed
    up, token = (int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray([up, token], np.int32))))
    where = chain[up]
    # a name never looked up before: no filesystem cache can hold a stale "absent" for it
    probe = where / f"{PROBE_NAME}_{token:08x}"
    error = None
    if jax.process_index() == 0:
        try:
            probe.write_text(f"{token}\n")
        except OSError as e:
            error = f"process 0 ({socket.gethostname()}) cannot write {probe}: {e}"
            with contextlib.suppress(OSError):  # a write cut short (the disk full) leaves the file
                probe.unlink()
    # (a collective: no process reads before process 0 has written)
    if failed_processes(error is not None):
        raise SetupError(error or f"process 0 cannot write a probe into {where} (its output says why)")
    if jax.process_index() != 0:
        try:
            seen = probe.read_text().strip()
        except OSError:
            seen = None
        if seen != str(token):
            error = (f"process {jax.process_index()} ({socket.gethostname()}) does not see the {what} "
                     f"{path}: not the probe process 0 wrote into {where} "
                     f"({probe.name} {'missing' if seen is None else 'holds another token'})")
    failed = failed_processes(error is not None)
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):
            probe.unlink()
    if failed:
        raise SetupError(
            (error + "; " if error else "")
            + f"the {what} must be one directory every host sees ({_processes(failed)} of "
            f"{jax.process_count()} {'do' if len(failed) > 1 else 'does'} not): a shared or mounted "
            "filesystem (NFS, Filestore, Cloud Storage FUSE `gcsfuse BUCKET /mnt/BUCKET`), not each host's own disk")


def coordinator_port_in_use(coordinator_address: str) -> str | None:
    """Why process 0 cannot start the coordination service on `coordinator_address`'s port, or
    None. JAX's service (gRPC) binds JAX_COORDINATOR_BIND_ADDRESS, else every address (`[::]:PORT`:
    dual-stack IPv6, or IPv4's 0.0.0.0 where that fails), and starts where any of its addresses
    binds. The probe binds the same addresses in turn and closes them again: only when none binds
    and one was EADDRINUSE (another program listens on the port) is the port taken. Starting the
    service there ended the process with a JaxRuntimeError traceback or SIGSEGV (both seen with
    jax 0.10-0.11), neither naming the setting. Any other outcome (no IPv6, an address this host
    lacks, a bind address that does not parse) is left for JAX to meet."""
    port = coordinator_address.rsplit(":", 1)[1]
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or f"[::]:{port}"
    host, _, bind_port = bind.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(bind_port)
        if not 0 <= number < 65536:
            return None
        if host in ("", "::"):  # every address: gRPC's dual-stack socket, else IPv4's wildcard
            candidates = [(socket.AF_INET6, ("::", number, 0, 0), True),
                          (socket.AF_INET, ("0.0.0.0", number), False)]
        else:
            candidates = [(family, address, False) for family, _, _, _, address in socket.getaddrinfo(
                host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
    except (OSError, ValueError):
        return None
    taken = False
    for family, address, dual_stack in candidates:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # SO_REUSEADDR as gRPC sets it: a closed connection's TIME_WAIT is no conflict
                # when its owner set it too
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if dual_stack:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind(address)
            return None  # one address binds: the service starts
        except OSError as e:
            taken = taken or e.errno == errno.EADDRINUSE
    return f"port {bind_port} is in use on this host ({bind})" if taken else None


def _coordination_client():
    """JAX's distributed runtime client (None without jax.distributed)."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a jax without the module
        return None
    return getattr(distributed.global_state, "client", None)


def _end_now(status: int) -> None:
    """End this process at once: output flushed, child processes (grain's loader workers)
    terminated, and no atexit handlers (JAX's shutdown barrier would wait for the others)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.terminate()
    logging.shutdown()
    os._exit(status)


def reported(error: BaseException) -> bool:
    """Whether `StopTogether` reported `error` to the other processes."""
    return getattr(error, "xdistill_reported", False)


def end_if_reported(error: BaseException, status: int) -> None:
    """If `StopTogether` reported `error`: end this process now with `status` (the caller has
    printed the error). Otherwise return."""
    if reported(error):
        _end_now(status)


def _by_process(client, key: str) -> dict[int, str]:
    """{process: value} of the key-value store's entries key/<process>."""
    return {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(key)}


class StopTogether:
    """A block after which every process of a multi-process run ends when one fails (module
    docstring). With one process, or without jax.distributed, it does nothing."""

    def __init__(self, poll_s: float = 0.5, seen_wait_s: float = 10.0):
        self.poll_s, self.seen_wait_s = poll_s, seen_wait_s
        self._client, self._thread, self._stop = None, None, threading.Event()

    def __enter__(self):
        if jax.process_count() > 1:
            self._client = _coordination_client()
        if self._client is not None:
            self._thread = threading.Thread(target=self._watch, name="xdistill-stop-together", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, error, tb):
        if self._client is None:
            return False
        self._stop.set()
        self._thread.join(timeout=5 * self.poll_s + 5)
        if error is not None:
            me = jax.process_index()
            # a collective that broke because another process ended (Gloo on the CPU: "Connection
            # closed by peer"): that process's report says why, this error is a consequence
            with contextlib.suppress(Exception):
                others = {p: r for p, r in self._reports().items() if p != me}
                if others:
                    log.info("after another process's failure: %s: %s", type(error).__name__, error)
                    self._stop_with(others)
            stopped = STOPPED if not isinstance(error, Exception) else ""  # SIGTERM/SIGINT's, not a failure
            report = f"{stopped}{type(error).__name__}: {error}".replace("\n", " ")[:4000]
            try:
                self._client.key_value_set(f"{FAILED_KEY}/{me}", report)
            except Exception as e:  # noqa: BLE001 - the service is gone: JAX's own handling remains
                log.warning("could not report this process's failure to the others: %s", e)
                return False
            error.xdistill_reported = True
            if me == 0:
                self._await_seen()
        return False

    def _reports(self) -> dict[int, str]:
        return _by_process(self._client, FAILED_KEY)

    def _await_seen(self) -> None:
        """Process 0 hosts the coordination service: it waits until each other process has
        seen a report or reported its own (at most `seen_wait_s`), so that they end by the
        report, not by the service's disappearance (JAX aborts a process then)."""
        others = set(range(jax.process_count())) - {0}
        deadline = time.monotonic() + self.seen_wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if others <= set(_by_process(self._client, SEEN_KEY)) | set(self._reports()):
                    return
            time.sleep(self.poll_s / 2)

    def _watch(self) -> None:
        me = jax.process_index()
        while not self._stop.wait(self.poll_s):
            try:
                reports = {p: r for p, r in self._reports().items() if p != me}
            except Exception:  # noqa: BLE001 - the service is gone; JAX's own handling ends us
                return
            if reports and not self._stop.is_set():
                self._stop_with(reports)

    def _stop_with(self, reports: dict[int, str]) -> None:
        """Another process failed: say which and why, and end this one with exit 2; or every
        report is a stop: end this one as stopped (EXIT_STOPPED)."""
        me, n = jax.process_index(), jax.process_count()
        with contextlib.suppress(Exception):
            self._client.key_value_set(f"{SEEN_KEY}/{me}", "1")
        if me == 0:
            self._await_seen()
        stopped = all(r.startswith(STOPPED) for r in reports.values())
        for p, report in sorted(reports.items()):
            if stopped:
                print(f"xdistill train: process {p} of {n} was stopped ({report[len(STOPPED):]}); process {me} "
                      f"({socket.gethostname()}) stops with it, before any step was trained: rerun the same "
                      "command to continue", file=sys.stderr, flush=True)
            else:
                print(f"xdistill train: process {p} of {n} failed during training ({report}); process "
                      f"{me} ({socket.gethostname()}) stops with it", file=sys.stderr, flush=True)
        _end_now(EXIT_STOPPED if stopped else 2)
