"""``python -m experiments.cityscapes``: see ``main.py``."""

from experiments.cityscapes import main

main.main()
