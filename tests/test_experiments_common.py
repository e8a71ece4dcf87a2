"""Tests of the shared experiment framework (experiments/common)."""

import functools
import gzip
import hashlib
import http.server
import json
import os
import re
import threading

import numpy as np
import pytest

from experiments.common import config as config_lib
from experiments.common import download
from experiments.common import methods
from experiments.common import tasks
from experiments.multimnist import input_pipeline as ip
from experiments.multimnist import main as main_lib
from experiments.multimnist import train
from experiments.multimnist.configs import default
import mgda_jax
from test_multimnist import fake_mnist, write_idx  # pylint: disable=g-bad-import-order

ROOT = os.path.join(os.path.dirname(__file__), '..')


# ----------------------------------------------------------------------------
# A loopback HTTP mirror


class _Handler(http.server.SimpleHTTPRequestHandler):
  requests = []

  def log_message(self, *args):
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests.append(self.path)
    super().do_GET()


@pytest.fixture(name='serve')
def fixture_serve():
  """``serve(folder) -> URL prefix`` of a local HTTP server for ``folder``."""
  servers = []

  def start(folder):
    handler = type('H', (_Handler,), {'requests': []})
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f'http://127.0.0.1:{server.server_address[1]}/', handler.requests

  yield start
  for s in servers:
    s.shutdown()
    s.server_close()


def _mirror(tmp_path, mnist):
  """A folder holding ``mnist`` as the four .gz files; their SHA-256."""
  folder = tmp_path / 'mirror'
  folder.mkdir()
  for key, name in ip.IDX_FILES.items():
    write_idx(str(folder / name), getattr(mnist, key), compress=True)
  return folder, {f'{n}.gz': hashlib.sha256(
      (folder / f'{n}.gz').read_bytes()).hexdigest()
                  for n in ip.IDX_FILES.values()}


# ----------------------------------------------------------------------------
# Downloads


def test_fetch_verifies_and_reuses(tmp_path, serve):
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'f.bin').write_bytes(b'payload')
  url, requests = serve(tmp_path / 'src')
  digest = hashlib.sha256(b'payload').hexdigest()
  path = download.fetch('f.bin', digest, [url], str(tmp_path / 'dl'),
                        log=lambda _: None)
  assert open(path, 'rb').read() == b'payload'
  download.fetch('f.bin', digest, [url], str(tmp_path / 'dl'))
  assert requests == ['/f.bin']  # the verified copy is reused


def test_a_corrupt_download_is_rejected_and_the_next_mirror_used(tmp_path,
                                                                serve):
  for name, data in (('bad', b'payloaX'), ('good', b'payload')):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'f.bin').write_bytes(data)
  bad, _ = serve(tmp_path / 'bad')
  good, _ = serve(tmp_path / 'good')
  digest = hashlib.sha256(b'payload').hexdigest()
  dest = tmp_path / 'dl'
  with pytest.raises(download.DownloadError, match='SHA-256 .* is not the '
                     'expected'):
    download.fetch('f.bin', digest, [bad], str(dest))
  assert os.listdir(dest) == []  # nothing corrupt is left behind
  messages = []
  path = download.fetch('f.bin', digest, [bad, good], str(dest),
                        log=messages.append)
  assert open(path, 'rb').read() == b'payload'
  assert messages == [f'downloaded {good}f.bin (SHA-256 verified)']


def test_mnist_is_downloaded_when_no_local_copy(tmp_path, serve, monkeypatch):
  mnist = fake_mnist(np.random.default_rng(0))
  folder, digests = _mirror(tmp_path, mnist)
  url, _ = serve(folder)
  monkeypatch.setattr(ip, 'SHA256', digests)
  got, where = ip.load_mnist(None, tfds_data_dir=str(tmp_path / 'no-tfds'),
                             download_dir=str(tmp_path / 'dl'),
                             mirrors=(url,), log=lambda _: None)
  assert where.startswith('download:')
  for a, b in zip(got, mnist):
    np.testing.assert_array_equal(a, b)
  # A corrupted mirror file: a clear error, not a silently bad data set.
  victim = folder / 'train-labels-idx1-ubyte.gz'
  victim.write_bytes(gzip.compress(b'\x00\x00\x08\x01garbage'))
  os.remove(tmp_path / 'dl' / 'train-labels-idx1-ubyte.gz')
  with pytest.raises(ip.MnistError, match='train-labels-idx1-ubyte.gz.*'
                     'SHA-256'):
    ip.load_mnist(None, tfds_data_dir=str(tmp_path / 'no-tfds'),
                  download_dir=str(tmp_path / 'dl'), mirrors=(url,),
                  log=lambda _: None)


def test_the_real_checksums_are_tfds_own():
  """SHA256 is the table TFDS ships (url_checksums/mnist.txt)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  path = os.path.join(os.path.dirname(tfds.__file__), 'url_checksums',
                      'mnist.txt')
  rows = [l.split('\t') for l in open(path).read().splitlines() if l]
  assert {r[3].strip(): r[2] for r in rows} == ip.SHA256
  assert all(r[0].startswith(ip.MIRRORS[0]) for r in rows)


# ----------------------------------------------------------------------------
# The main job from each data source (what `make train` runs)


def _cli(tmp_path, *extra):
  test_file = os.path.join(os.path.dirname(main_lib.DEFAULT_CONFIG), 'test.py')
  return main_lib.main([
      'prog', f'--config={test_file}', '--config.epochs=1',
      f'--workdir={tmp_path / "w"}', f'--config.data.cache_dir={tmp_path / "c"}',
      *extra])


def test_main_job_with_the_download_path(tmp_path, serve, monkeypatch,
                                         capsys):
  mnist = fake_mnist(np.random.default_rng(1))
  folder, digests = _mirror(tmp_path, mnist)
  url, requests = serve(folder)
  monkeypatch.setattr(ip, 'SHA256', digests)
  result = _cli(tmp_path, f'--config.data.tfds_data_dir={tmp_path / "none"}',
                f'--config.data.download_dir={tmp_path / "dl"}',
                f"--config.data.mirrors=('{url}',)")
  assert len(requests) == 4 and result['epochs'] == 1
  assert 0 <= result['test_acc_left'] <= 1
  capsys.readouterr()


def test_main_job_with_only_a_tfds_dir(tmp_path, capsys):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=300):
    result = _cli(tmp_path, '--config.data.download=False')
  assert result['epochs'] == 1
  capsys.readouterr()


# ----------------------------------------------------------------------------
# Configs


def test_every_registered_method_has_a_section_and_builds():
  data = ip.build_multimnist(fake_mnist(np.random.default_rng(2)), seed=0)
  for name in config_lib.method_names():
    c = default.get_config()
    c.method = name
    config_lib.validate(c, train.TASKS.names, ['acc', 'loss'],
                        default.get_config())
    m = methods.build(c, 2, steps_per_epoch=3, shared=train.EXPERIMENT.shared,
                      extra=train.method_args(c, data, (0, 1)))
    assert m.grad_kind == ('parameters' if name == 'mgda' else
                           'representation')
    if name in mgda_jax.METHODS:
      spec = mgda_jax.METHODS[name]
      for hp, value in spec.hyperparams.items():
        if hp != 'steps_per_epoch':
          assert hp in c[name], (name, hp)


def test_a_config_value_reaches_the_method():
  """--config.cagrad.c is the c of the built transform: its update is
  CAGrad's with that c, and differs from the default's."""
  import optax  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.method = 'cagrad'
  c.cagrad.c = 0.9
  m = methods.build(c, 2, steps_per_epoch=1, shared=None)
  params = {'w': np.zeros(3, np.float32)}
  grads = {'w': np.array([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]], np.float32)}

  def update(tx):
    return np.asarray(tx.update(grads, tx.init(params), params)[0]['w'])

  sgd = lambda: optax.sgd(0.05, momentum=0.9)
  np.testing.assert_allclose(
      update(m.tx), update(optax.chain(mgda_jax.cagrad(2, c=0.9), sgd())),
      rtol=1e-6)
  assert not np.allclose(
      update(m.tx), update(optax.chain(mgda_jax.cagrad(2, c=0.4), sgd())))


def test_bad_configs_name_the_field():
  names, metrics, d = train.TASKS.names, ['acc', 'loss'], default.get_config()
  cases = [('epochs', 0, 'config.epochs must be >= 1'),
           ('optimizer.name', 'lbfgs', 'config.optimizer.name'),
           ('optimizer.learning_rate', -1.0, 'learning_rate must be > 0'),
           ('tasks', (0, 2), r'config.tasks must be distinct indices in \[0, 2\)'),
           ('select', 'f1', 'config.select must be one of'),
           ('input', 'gpu', 'config.input must be one of'),
           ('famo.learning_rate', 0.5, "config.famo.learning_rate=0.5 is set, "
            "but config.method is 'mgda_ub'")]
  for field, value, match in cases:
    c = default.get_config()
    *path, last = field.split('.')
    node = c
    for p in path:
      node = node[p]
    node[last] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(c, names, metrics, d)


def test_help_lists_every_field_with_its_default(capsys):
  with pytest.raises(SystemExit) as e:
    main_lib.main(['prog', '--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for key, value in config_lib.flatten(default.get_config()).items():
    section = key.split('.')[0]
    if section in mgda_jax.METHODS:
      assert re.search(rf'{section}: .*{key.split(".", 1)[1]}=', out), key
    else:
      assert f'{key} = ' in out, key


def test_readme_flag_list_matches_the_parser():
  """The README's table of MultiMNIST config fields is the real one."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  block = text.split('<!-- config-fields -->')[1].split('<!-- /config-fields -->')[0]
  listed = set(re.findall(r'^\| `([a-z_.]+)` \|', block, re.M))
  real = {k for k in config_lib.flatten(default.get_config())
          if k.split('.')[0] not in mgda_jax.METHODS}
  assert listed == real
  for key, value in config_lib.flatten(default.get_config()).items():
    if key in listed:
      row = re.search(rf'^\| `{re.escape(key)}` \| `([^`]*)` \|', block, re.M)
      assert row and row.group(1) == json.dumps(value), key


# ----------------------------------------------------------------------------
# Task specs and Δm


def test_delta_m_against_its_definition():
  # Two accuracies (higher is better) and one error (lower is better).
  got = tasks.delta_m([0.9, 0.5, 2.0], [1.0, 0.5, 1.0], [True, True, False])
  assert got == pytest.approx(100 * (0.1 + 0.0 + 1.0) / 3)
  with pytest.raises(ValueError, match='equal lengths'):
    tasks.delta_m([1.0], [1.0, 2.0], [True])


def test_best_epoch_follows_the_metric_direction():
  recs = [{'epoch': 1, 'val_acc': [0.5, 0.5], 'val_loss': [1.0, 1.0]},
          {'epoch': 2, 'val_acc': [0.7, 0.5], 'val_loss': [2.0, 2.0]},
          {'epoch': 3, 'val_acc': [0.5, 0.7], 'val_loss': [1.0, 1.0]}]
  assert tasks.select_best(recs, train.TASKS.metric('acc'))['epoch'] == 2
  assert tasks.select_best(recs, train.TASKS.metric('loss'))['epoch'] == 1


# ----------------------------------------------------------------------------
# The reproduction's archive of finished runs


def _fake_run(workdir, method, seed, epochs, acc, **overrides):
  """A finished run's records, as the trainer writes them (plus clutter)."""
  from experiments.common import reproduce  # pylint: disable=g-import-not-at-top
  config = config_lib.flatten(reproduce.make_config(
      train.EXPERIMENT, method, seed, epochs, overrides))
  subs = ['left', 'right'] if method == 'single_task' else ['']
  for t, sub in enumerate(subs):
    d = os.path.join(workdir, sub)
    os.makedirs(os.path.join(d, 'checkpoints', '3'), exist_ok=True)
    with open(os.path.join(d, 'checkpoints', '3', 'state'), 'w') as f:
      f.write('not a record')
    with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
      for e in range(epochs):
        f.write(json.dumps({'epoch': e + 1,
                            'val_acc': [acc - 0.01 * (epochs - e)] * 2})
                + '\n')
    with open(os.path.join(d, 'config.json'), 'w') as f:
      json.dump(dict(config, tasks=[t] if sub else []), f)
  with open(os.path.join(workdir, 'final.json'), 'w') as f:
    json.dump({'method': method, 'seed': seed, 'epochs': epochs,
               'best_epoch': epochs, 'seconds_per_epoch': 1.0,
               'test_acc_left': acc, 'test_acc_right': acc - 0.01}, f)


def _no_training(*args, **kwargs):
  raise AssertionError('a run was trained although it was archived')


def test_archive_keeps_records_and_restores_without_training(tmp_path,
                                                            monkeypatch):
  from experiments.common import reproduce  # pylint: disable=g-import-not-at-top
  from experiments.common import trainer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(trainer, 'train_and_evaluate', _no_training)
  exp = train.EXPERIMENT
  runs, archive = str(tmp_path / 'runs'), str(tmp_path / 'archive')
  _fake_run(os.path.join(runs, 'mgda_ub-seed0'), 'mgda_ub', 0, 3, 0.9)
  _fake_run(os.path.join(runs, 'single_task-seed0'), 'single_task', 0, 3, 0.95)
  # Finished runs go to the archive: records only, never checkpoints.
  got = reproduce.run_all(exp, ['mgda_ub', 'single_task'], [0, 1],
                          3, runs, archive=archive, train=False)
  assert sorted(got) == [('mgda_ub', 0), ('single_task', 0)]
  assert reproduce.missing_runs(got, ['mgda_ub', 'single_task'], [0, 1]) == [
      'mgda_ub-seed1', 'single_task-seed1']
  assert reproduce.run_records(os.path.join(archive, 'single_task-seed0')) == [
      'final.json', 'left/config.json', 'left/metrics.jsonl',
      'right/config.json', 'right/metrics.jsonl']
  assert not any('checkpoints' in r for _, _, fs in os.walk(archive)
                 for r in fs)
  # On a new machine (no runs/), the archive is restored, nothing trained;
  # a run of another length is not taken for a finished one.
  # An unfinished run in the way is moved aside (a later, longer run would
  # resume its checkpoints), not mixed with the restored records.
  runs2 = str(tmp_path / 'runs2')
  os.makedirs(os.path.join(runs2, 'mgda_ub-seed0', 'checkpoints', '1'))
  got2 = reproduce.run_all(exp, ['mgda_ub', 'single_task'], [0], 3,
                           runs2, archive=archive)
  assert got2 == got
  assert not os.path.exists(os.path.join(runs2, 'mgda_ub-seed0',
                                         'checkpoints'))
  assert os.path.isdir(os.path.join(runs2, 'mgda_ub-seed0.replaced-1',
                                    'checkpoints', '1'))
  with open(os.path.join(runs2, 'single_task-seed0', 'left',
                         'metrics.jsonl')) as f:
    assert len(f.readlines()) == 3
  # Data locations may differ between machines; nothing else may.
  got3 = reproduce.run_all(exp, ['mgda_ub'], [0], 3, str(tmp_path / 'runs3'),
                           archive=archive,
                           overrides={'data.mnist_dir': '/elsewhere'})
  assert got3[('mgda_ub', 0)] == got[('mgda_ub', 0)]
  for overrides, epochs in [({'optimizer.learning_rate': 0.01}, 3), ({}, 4)]:
    with pytest.raises(AssertionError, match='trained although'):
      reproduce.run_all(exp, ['mgda_ub'], [0], epochs, str(tmp_path / 'r4'),
                        archive=archive, overrides=overrides)


def test_table_only_tabulates_a_partial_reproduction(tmp_path):
  from experiments.multimnist import reproduce as mm_reproduce  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'docs'
  archive = out / 'runs' / 'multimnist-e3'
  for (m, s, acc) in [('single_task', 0, 0.96), ('mgda_ub', 0, 0.95),
                      ('mgda_ub', 1, 0.97)]:
    _fake_run(str(archive / f'{m}-seed{s}'), m, s, 3, acc)
  mm_reproduce.main(['--table-only', '--epochs', '3', '--seeds', '0', '1',
                     '--methods', 'single_task', 'mgda_ub', 'gradnorm',
                     '--out', str(out), '--runs', str(tmp_path / 'runs')])
  text = (out / 'RESULTS.md').read_text()
  rows = {l.split(' | ')[0]: l for l in text.splitlines()
          if l.startswith('| ') and 'method' not in l and '---' not in l}
  # Mean ± std over the seeds that exist (population std, as numpy), the
  # count where it is short; no std for a single seed; Δm against single
  # task: -(0.96/0.96 - 1 + 0.95/0.95 - 1)/2 = 0 for mgda_ub's mean here.
  assert '96.00 ± 1.00 | 95.00 ± 1.00 | +0.00' in rows['| MGDA-UB (ours)']
  assert '96.00 (n = 1) | 95.00 (n = 1) |' in rows['| Single task']
  assert set(rows) == {'| Single task', '| MGDA-UB (ours)'}  # no GradNorm
  assert ('Not run yet: single_task-seed1, gradnorm-seed0, gradnorm-seed1.'
          in text)
  assert (out / 'multimnist_e3_curves.png').exists()
  with pytest.raises(SystemExit, match='No finished run'):
    mm_reproduce.main(['--table-only', '--epochs', '5', '--out', str(out),
                       '--runs', str(tmp_path / 'runs')])
