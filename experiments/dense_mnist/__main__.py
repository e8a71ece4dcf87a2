"""``python -m experiments.dense_mnist``: see ``main.py``."""

from experiments.dense_mnist import main

main.main()
