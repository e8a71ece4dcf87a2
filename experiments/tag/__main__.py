"""``python -m experiments.tag``: see ``main.py``."""

from experiments.tag import main

main.main()
