"""Seconds per MultiMNIST epoch: chunked ``lax.scan`` against a step per call.

Trains the MultiMNIST program (``experiments/multimnist``, the framework's
own loop, evaluation included) on random data of MultiMNIST's sizes (50k
training, 10k validation and 10k test images of 28 x 28; the cost does not
depend on the pixels), two epochs per configuration, and reports the second
epoch's seconds (the first includes compilation). Each method runs with
``config.chunk`` 1 (one compiled step per call) and 15 (a ``lax.scan`` of
15 steps per call, MultiMNIST's default on CPU and on accelerators), in one
run.

    python -m benchmarks.bench_epoch [--methods mgda_ub,uniform_weighting]
        [--chunks 1,15] [--train 50000]

It is part of ``benchmarks/gpu.sh`` (the Performance issue's GPU figures);
on a 2-core CPU the scanned epoch is 1.1x faster (BENCHMARKS.md, "Epoch
structure on XLA:CPU").
"""

import argparse
import json
import os
import platform
import tempfile

import jax
import numpy as np

from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import train
from experiments.multimnist.configs import default


def random_multimnist(n_train: int, n_eval: int, seed: int = 0):
  """MultiMNIST-shaped splits of random normalised pixels and labels."""
  rng = np.random.default_rng(seed)

  def split(n):
    images = rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
    return ip.Split(images, rng.integers(0, 10, (n, 2)).astype(np.int32))
  return ip.MultiMnist(split(n_train), split(n_eval), split(n_eval))


def epoch_seconds(method: str, chunk: int, data, epochs: int = 2) -> dict:
  """The last epoch's seconds (and the first's) of a short run."""
  config = default.get_config()
  config.method, config.chunk, config.epochs = method, chunk, epochs
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir, data, log=lambda _: None)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  return {'first': records[0]['seconds'], 'last': records[-1]['seconds']}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--methods', default='mgda_ub,uniform_weighting')
  p.add_argument('--chunks', default='1,15')
  p.add_argument('--train', type=int, default=50_000,
                 help='training images (the evaluation splits: a fifth)')
  p.add_argument('--epochs', type=int, default=2)
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  print(f'jax {jax.__version__} on {dev.platform} ({dev.device_kind}); '
        f'{platform.processor() or ""} {os.cpu_count()} CPUs')
  data = random_multimnist(args.train, max(args.train // 5, 1000))
  chunks = [int(c) for c in args.chunks.split(',')]
  print(f'\n== seconds per MultiMNIST epoch ({args.train} training images, '
        f'batch 256, evaluation included; epoch {args.epochs} of '
        f'{args.epochs}) ==')
  for method in args.methods.split(','):
    t = {c: epoch_seconds(method, c, data, args.epochs) for c in chunks}
    row = ', '.join(f"chunk {c}: {t[c]['last']:.2f} s (first epoch "
                    f"{t[c]['first']:.2f} s)" for c in chunks)
    ratio = (f"; chunk {chunks[0]} / chunk {chunks[-1]}: "
             f"{t[chunks[0]]['last'] / t[chunks[-1]]['last']:.2f}"
             if len(chunks) > 1 else '')
    print(f'  {method:18s} {row}{ratio}', flush=True)


if __name__ == '__main__':
  main()
