"""Orbax checkpoints of the train state plus the data iterator's state, in `workdir/checkpoints/`.

Layout (orbax CheckpointManager, one directory per step):
  checkpoints/<step>/state/   the TrainState pytree (orbax's PyTree format, each array written
                              whole by its first replica: `state_item_handler`), restored into an abstract
                              target from `jax.eval_shape`, so arrays land with the target's
                              shardings (replicated on the mesh) on any device count.
  checkpoints/<step>/data/    JSON: the loader iterator's state (so a resumed run sees the same
                              data order) and small bookkeeping (e.g. skipped non-finite steps).

Saves are async (the step loop continues while the arrays are written); orbax writes into a
temporary directory and renames it when complete, so a killed save never looks complete.
Every process calls save/restore (orbax coordinates multi-host writes).
"""

from __future__ import annotations

import inspect
import logging
import pathlib
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def complete_steps(directory) -> list[int]:
    """Steps with a complete checkpoint in `directory` (orbax renames a save's folder to its bare
    step number once it is complete; temporary and set-aside folders carry a suffix)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored into the current config's state; the message says why."""


def _closed_loop_callback(exc: BaseException | None) -> bool:
    """Whether `exc` is asyncio's "Event loop is closed", raised where a callback was handed to a
    loop that is closed (`call_soon_threadsafe` -> `_check_closed`)."""
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_name == "_check_closed"


def _unfinished_coroutine_at_exit(unraisable) -> bool:
    """Whether `unraisable` is a coroutine's "sys.meta_path is None" ImportError: a coroutine that
    never ran to its end (orbax's writes after a failed save) closed while Python shuts down
    (nothing may be imported then: `inspect` is imported with the module)."""
    exc = unraisable.exc_value
    return (isinstance(exc, ImportError) and "sys.meta_path is None" in str(exc)
            and inspect.iscoroutine(unraisable.object))


def quiet_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" errors of a failed restore's reads, and the unfinished
    coroutines of a failed write finalised at exit (idempotent).

    When a read of a damaged checkpoint fails, orbax closes the event loop it ran on while
    tensorstore reads started on that loop are still in flight; as they finish, each hands its
    result to the closed loop, and Python printed the RuntimeError of each through
    `sys.unraisablehook`: 1,029 tracebacks while one damaged checkpoint of the test runs was
    tried, before the one warning that says what happened. Installed before a restore (the
    errors come while orbax is still restoring, and after), the hook logs those at debug level
    and passes every other unraisable exception to the hook it wraps."""
    previous = sys.unraisablehook
    if getattr(previous, "_xdistill_quiet", False):
        return

    def hook(unraisable):
        if _closed_loop_callback(unraisable.exc_value):
            log.debug("a read of a checkpoint that failed to restore finished after its event loop closed")
            return
        if _unfinished_coroutine_at_exit(unraisable):
            return  # a failed write's coroutines, finalised as the interpreter ends (425 tracebacks)
        previous(unraisable)

    hook._xdistill_quiet = True
    sys.unraisablehook = hook


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _describe_tree(tree) -> dict[str, tuple]:
    """{"params/depth/encoder/...": shape} for the params and batch_stats leaves.

    Paths are spelled the same whether the tree is the TrainState dataclass or orbax's
    metadata (nested dicts); the optimiser state mirrors params and is left to orbax.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, x in leaves:
        name = "/".join(_key_name(e) for e in path)
        if name.startswith(("params/", "batch_stats/")):
            out[name] = tuple(getattr(x, "shape", ()))
    return out


def state_item_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's orbax handler: what `ocp.StandardCheckpointHandler` builds (its own
    concurrency limits, the same files on disk), except that each array is written whole by its
    first replica (`use_replica_parallel=False`: orbax's own default where JAX_PLATFORMS names a
    GPU; elsewhere, a GPU host with JAX_PLATFORMS unset included, it writes replica-parallel).

    Replica-parallel writes (orbax's default elsewhere) cut every replicated array into one slice
    per device, each slice an eager `jit(slice)` compiled once per shape and process and
    dispatched at every save. For the ResNet-18 train state (308 MiB: two ResNet-18s and Adam's
    moments) replicated on 4 CPU devices, orbax's standard handler took 9.2 s for a process's
    first save and 2.4 s for later ones; written whole, 1.2 s each, as on one device
    (`python benchmarks/checkpoint_save.py`, benchmarks/RESULTS.md). One device's copy of so
    small a state costs little to bring to the host."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    whole = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        # the per-array metadata files orbax's default handler writes (and checks after a merge)
        array_metadata_store=getattr(default, "_array_metadata_store", None))
    registry = ocp.type_handlers.create_type_handler_registry(
        *((ty, whole if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
          for ty in ocp.type_handlers.supported_types()))
    return ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                       type_handler_registry=registry)


class Checkpointer:
    """Save/restore (state, data_state) pairs in `directory` with orbax."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # we decide when to save (every N steps, at the end, on SIGTERM)
            save_interval_steps=1)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": state_item_handler(), "data": ocp.JsonCheckpointHandler()})
        self.damaged_steps: list[int] = []  # newer steps the last `restore` skipped as unreadable
        self._pending: int | None = None  # the step of the last save started
        # a failed write (disk full) leaves orbax's in-flight reads and writes handing results to
        # a closed event loop, as a damaged checkpoint's reads do: one error, not a thousand
        quiet_closed_loop_callbacks()

    def _write_error(self, error: Exception, step: int | None) -> CheckpointError:
        """A failed save as one CheckpointError: the step, the error, the last complete checkpoint."""
        steps = [s for s in complete_steps(self.directory) if s != step]
        where = f"checkpoint {self.directory / str(step)}" if step is not None else f"a checkpoint in {self.directory}"
        last = (f"the last complete checkpoint is {self.directory / str(steps[-1])}: rerun the same command "
                "to resume from it once the cause is fixed" if steps else "no complete checkpoint was written")
        text = str(error)
        if len(text) > 400:  # orbax's messages end with the OS's reason ("No space left on device")
            text = f"{text[:200]} ... {text[-200:]}"
        return CheckpointError(f"writing {where} failed ({type(error).__name__}: {text}); {last}")

    def set_aside(self, steps) -> list[pathlib.Path]:
        """Rename the step folders `steps` to `<step>.damaged` (`.damaged-2`, ... if taken), so that
        a run that fell back to an older checkpoint can save those steps again; returns the new
        paths. Call `reload` afterwards (on every process of a multi-host run)."""
        moved = []
        for s in steps:
            src = self.directory / str(s)
            dst, n = self.directory / f"{s}.damaged", 1
            while dst.exists():
                n += 1
                dst = self.directory / f"{s}.damaged-{n}"
            src.rename(dst)
            moved.append(dst)
        return moved

    def reload(self) -> None:
        """Read the step folders again (after `set_aside`)."""
        self.manager.reload()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict[str, Any] | None = None, *, force: bool = True) -> bool:
        """Start an (async) save of `state` and `data_state` at `step`."""
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  data=ocp.args.JsonSave(data_state or {}))
        self.wait()  # an earlier async save's failure named with its own step (orbax waits for it anyway)
        try:
            saved = self.manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds (ValueError for ENOSPC)
            raise self._write_error(e, step) from e
        self._pending = step
        return saved

    def wait(self):
        """Block until pending async saves are on disk; a failed one raises CheckpointError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e, self._pending) from e

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()

    def read_data_state(self, step: int) -> dict:
        """The JSON data state (loader position, bookkeeping) saved at `step`, without the arrays."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {})

    def _restore_step(self, step: int, abstract_state):
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"] or {})

    def _mismatch_message(self, step: int, abstract_state, error: Exception) -> str:
        """Compare the saved tree with the target and say which leaves differ."""
        msg = f"checkpoint {self.directory / str(step)} does not match the current config's train state"
        try:
            meta = self.manager.item_metadata(step)["state"]
            saved = _describe_tree(meta)
            wanted = _describe_tree(abstract_state)
            missing = sorted(set(wanted) - set(saved))
            extra = sorted(set(saved) - set(wanted))
            shape = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
            parts = []
            if missing:
                parts.append(f"{len(missing)} parameters missing from the checkpoint, e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} unexpected parameters in the checkpoint, e.g. {extra[:3]}")
            if shape:
                k = shape[0]
                parts.append(f"{len(shape)} shape mismatches, e.g. {k}: checkpoint {saved[k]} vs config {wanted[k]}")
            if parts:
                return msg + ": " + "; ".join(parts)
        except Exception:  # metadata unreadable: fall through to the orbax error
            pass
        return f"{msg} ({type(error).__name__}: {str(error)[:300]})"

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, data_state) from `step` (default: the latest that restores).

        A latest checkpoint that cannot be read (truncated, partly deleted) is skipped with a
        warning naming it and the one used instead. A checkpoint whose tree or shapes differ from
        `abstract_state` raises CheckpointError naming the differing parameters. Returns
        (None, None, None) when there is no checkpoint; else (state, data_state, step).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        self.damaged_steps = []
        if not steps:
            return None, None, None
        wanted = _describe_tree(abstract_state)
        quiet_closed_loop_callbacks()  # a damaged checkpoint's reads that end after their loop
        failures = []
        for s in steps:
            try:
                meta = self.manager.item_metadata(s)["state"]
                saved = _describe_tree(meta) if meta is not None else None
            except Exception:  # unreadable metadata: try the restore, it gives the real error
                saved = None
            if saved is not None and saved != wanted:
                raise CheckpointError(self._mismatch_message(s, abstract_state, ValueError("tree mismatch")))
            try:
                state, data_state = self._restore_step(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged directory
                if "do not match" in str(e):
                    raise CheckpointError(self._mismatch_message(s, abstract_state, e)) from e
                if len(steps) == 1:  # the step asked for: nothing older to fall back to
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(s)} cannot be read: damaged or incomplete "
                        f"({type(e).__name__}: {str(e)[:300]})") from e
                failures.append((s, e))
                log.warning("checkpoint %s is unreadable (%s: %s); trying an older one",
                            self.directory / str(s), type(e).__name__, str(e)[:200])
                continue
            if failures:
                log.warning("restored checkpoint %s instead of the damaged %s", self.directory / str(s),
                            ", ".join(str(self.directory / str(f)) for f, _ in failures))
                self.damaged_steps = [f for f, _ in failures]
            return state, data_state, s
        raise CheckpointError("no checkpoint in {} could be restored: {}".format(
            self.directory, "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failures)))
