"""`xdistill train --config configs/X.py[:arg] --workdir W [--config.a.b=value ...]`.

Trains (or resumes) the run in W. Without --config, the workdir's saved config.json is used
(resume). Exit status: 0 finished, 3 non-finite loss (last good checkpoint kept), 75 stopped by
SIGTERM/SIGINT after saving a checkpoint (rerun to continue), 2 bad config or workdir (in a
multi-host run, once the processes have joined: on any process, or a workdir that not every host
sees, and every process exits 2; a config that fails to load or validate before they join stops
that process alone, and the others' `jax.distributed.initialize` times out). 2 also for a record
of the prepared split or teacher store that cannot be read during the run (a damaged store: the
shard file, record and example named, and the last checkpoint to resume from once it is
repaired). In a multi-host run any error of one process during training (such a record, a disk
error) ends every process at once: that one with its own message and status, the others with
exit 2 naming it (`hosts.StopTogether`; before, both waited out JAX's 5-minute shutdown barrier
and aborted).
"""

from __future__ import annotations

import logging
import sys
import traceback

ACCEPTS_EXTRA_ARGS = True


def add_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="config file (configs/*.py, optionally path.py:arg); default: WORKDIR/config.json")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config.json)")
    parser.add_argument("--compilation-cache", default=None,
                        help="persistent XLA compile cache dir ('off' to disable); default "
                             "$XDISTILL_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR or ~/.cache/xdistill_jax/jax_cache")
    parser.epilog = ("Override any config field with --config.FIELD=VALUE, e.g. --config.distill.weight=0 "
                     "(baseline Monodepth2) or --config.optim.batch_size=8. The KITTI configs need "
                     "--config.model.init=PATH.msgpack (ImageNet encoders from `xdistill convert-weights "
                     "--torchvision`) or --config.model.init=scratch.")


def run(args) -> int:
    from xdistill_jax import config_utils, log_setup
    from xdistill_jax.checkpoints import CheckpointError

    log_setup.configure(logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.config:
            config = config_utils.apply_overrides(config_utils.load_config_file(args.config), args.extra_args)
        else:
            config = config_utils.apply_overrides(config_utils.load_config(args.workdir), args.extra_args)
        config_utils.validate(config)
    except config_utils.ConfigError as e:
        print(f"xdistill train: {e}", file=sys.stderr)
        return 2
    from xdistill_jax import hosts, train, training_loop
    from xdistill_jax.compilation_cache import enable_compilation_cache
    from xdistill_jax.hosts import SetupError

    try:
        # the processes of a multi-host run join first, so that a cache directory one host cannot
        # make stops every process (it is enabled before anything compiles, the agreement included)
        training_loop.maybe_initialize_distributed(config)
        with hosts.agree("to enable its compilation cache"):
            enable_compilation_cache(getattr(args, "compilation_cache", None))
    except (ValueError, SetupError) as e:  # ConfigError is a ValueError
        print(f"xdistill train: {e}", file=sys.stderr)
        return 2
    from data_pipelines.damaged_store import DamagedStoreError

    try:
        return train.train_and_evaluate(config, args.workdir)
    except (CheckpointError, config_utils.ConfigError, SetupError, DamagedStoreError) as e:
        print(f"xdistill train: {e}", file=sys.stderr)
        hosts.end_if_reported(e, 2)  # several processes: the others have been told; no shutdown barrier
        return 2
    except Exception as e:
        if hosts.reported(e):
            traceback.print_exc()
            hosts.end_if_reported(e, 1)
        raise
