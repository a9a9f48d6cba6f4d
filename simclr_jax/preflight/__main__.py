"""`python -m simclr_jax.preflight`: the process set up for libtpu, then the command line."""

import sys

from simclr_jax.preflight.cli import main
from simclr_jax.preflight.hardware import quiet_libtpu_environment, rerun_with_raised_stack_limit

if __name__ == "__main__":
    rerun_with_raised_stack_limit()
    quiet_libtpu_environment()
    sys.exit(main())
