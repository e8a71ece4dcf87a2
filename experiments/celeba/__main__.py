"""``python -m experiments.celeba``: see ``main.py``."""

from experiments.celeba import main

main.main()
