"""Per-epoch metrics: ``metrics.jsonl`` and TensorBoard; a tqdm progress bar."""

import json
import os
import sys
from typing import Any

import tqdm


class Logger:
  """JSONL and TensorBoard metrics; on resume, keeps only finished epochs.

  A record is one epoch: ``{'epoch': n, name: value or [per-task values]}``.
  Lines of epochs after ``resume_epoch`` (written before an interruption,
  past the last checkpoint) are dropped, so the file matches the state.
  """

  def __init__(self, workdir: str, resume_epoch: int, write: bool = True):
    """``write=False``: read and keep records, write no file (the
    non-primary processes of a multi-process job)."""
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.records = []
    self.writes = write
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by the interruption
          if rec.get('epoch', 0) <= resume_epoch:
            self.records.append(rec)
    self.tb = None
    if not write:
      return
    with open(self.path, 'w') as f:
      for rec in self.records:
        f.write(json.dumps(rec) + '\n')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                              purge_step=resume_epoch + 1)
    except ImportError:
      self.tb = None

  def write(self, record: dict[str, Any], task_names=()):
    self.records.append(record)
    if not self.writes:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
          if isinstance(v, (int, float)) and name != 'epoch':
            sub = (task_names[i] if len(values) == len(task_names) else i)
            tag = name if len(values) == 1 else f'{name}/{sub}'
            self.tb.add_scalar(tag, v, record['epoch'])
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def progress(epoch: int, epochs: int, total: int):
  """A ``tqdm`` bar over an epoch's batches (to stderr)."""
  return tqdm.tqdm(total=total, desc=f'epoch {epoch}/{epochs}', unit='batch',
                   file=sys.stderr, leave=True, dynamic_ncols=True,
                   mininterval=0.5)
