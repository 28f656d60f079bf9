import sys

from xdistill_jax.cli import main

sys.exit(main())
