"""`python -m jax_nlu_ppo` is the `jax-nlu-ppo` command."""
import sys

from jax_nlu_ppo.cli import main

sys.exit(main())
