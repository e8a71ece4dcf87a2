"""Verified downloads: known files from a list of mirrors, checked by SHA-256.

A file is fetched into ``dest_dir`` from the first mirror that serves it
with the expected SHA-256; a file already there with the right digest is not
fetched again. A download whose digest differs is deleted and the next
mirror tried; if none serves a good copy, :class:`DownloadError` says what
each mirror returned. Mirrors are URL prefixes, so a test (or a user behind
a proxy) can point them at a local HTTP server.
"""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from typing import Mapping, Sequence


class DataError(RuntimeError):
  """A data set could not be found, downloaded or read (a clear message)."""


class DownloadError(DataError):
  """No mirror served a file with the expected checksum."""


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def fetch(name: str, digest: str, mirrors: Sequence[str], dest_dir: str, *,
          timeout: float = 60.0, log=print) -> str:
  """``dest_dir/name``, downloaded from a mirror and verified.

  Args:
    name: the file name, appended to each mirror prefix.
    digest: its expected SHA-256, hex.
    mirrors: URL prefixes (``https://host/path/``), tried in order.
    dest_dir: where the verified file is kept.
    timeout: seconds per connection.
    log: progress messages.

  Returns:
    The path of the verified file.

  Raises:
    DownloadError: every mirror failed or served a corrupt file.
  """
  os.makedirs(dest_dir, exist_ok=True)
  path = os.path.join(dest_dir, name)
  if os.path.exists(path) and sha256(path) == digest:
    return path
  errors = []
  for mirror in mirrors:
    url = mirror.rstrip('/') + '/' + name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f'.{name}.')
    try:
      with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(
          url, timeout=timeout) as response:
        while block := response.read(1 << 20):
          out.write(block)
      got = sha256(tmp)
      if got != digest:
        errors.append(f'{url}: SHA-256 {got} is not the expected {digest} '
                      '(corrupt or different file; deleted)')
        continue
      os.replace(tmp, path)
      log(f'downloaded {url} (SHA-256 verified)')
      return path
    except (urllib.error.URLError, OSError, ValueError) as e:
      errors.append(f'{url}: {type(e).__name__}: {e}')
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise DownloadError(f'could not download {name}: ' + '; '.join(errors))


def fetch_all(files: Mapping[str, str], mirrors: Sequence[str],
              dest_dir: str, **kwargs) -> dict[str, str]:
  """:func:`fetch` for every ``{name: sha256}``; returns ``{name: path}``."""
  return {name: fetch(name, digest, mirrors, dest_dir, **kwargs)
          for name, digest in files.items()}
