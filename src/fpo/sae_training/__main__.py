"""``python -m fpo.sae_training``: see `fpo.sae_training.cli`."""

from fpo.sae_training.cli import main

main()
