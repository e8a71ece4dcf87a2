"""A tiny TAG protocol for tests: two tasks, one short epoch."""

from experiments.tag.configs import mnist


def get_config():
  c = mnist.get_config()
  c.epochs = 1
  c.batch_size = 32
  c.chunk = 1
  c.eval_batch_size = 50
  c.max_train_examples = 128
  c.tasks = (0, 6)
  c.tag.budgets = (1, 2)
  c.tag.random_draws = 1
  c.tag.linearized = False  # its path: the lookahead's, linearize=True
  return c
