"""``python -m experiments.multimnist``: see ``main.py``."""

from experiments.multimnist import main

main.main()
