"""One training run per workdir: an exclusive lock file `<workdir>/train.lock`, held for the whole run.

The lock is an `flock` on the file (Linux maps it to a POSIX lock on NFS), so the kernel (or the NFS lock manager)
releases it when the holder dies in any way, kill -9 included: a dead holder never blocks the next launch. (Not
`lockf`: a POSIX lock is dropped when the process closes *any* descriptor of the file, e.g. to read the record.) The file also records who
holds it (host, pid, start time): a second launch names the holder, and a launch that finds the record of a holder
that did not release the lock cleanly (killed, machine lost) takes it over with a warning.

Object-store workdirs (`gs://...`) have no file locks; they are not locked (a warning says so).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from absl import logging

from ddpm_jax.errors import UserError

LOCK_FILE = 'train.lock'


class WorkdirLockedError(UserError):
  """Another live process is training in this workdir."""


def _describe(record: dict) -> str:
  since = record.get('since')
  when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since)) if isinstance(since, (int, float)) else '?'
  return f'host {record.get("host", "?")}, pid {record.get("pid", "?")}, since {when}'


class WorkdirLock:
  """Context manager holding the training lock of `workdir` (a no-op on processes other than 0)."""

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._active = process_index == 0 and '://' not in workdir
    self._fd: Optional[int] = None
    if process_index == 0 and not self._active:
      logging.warning('%s is an object store path: it is not locked against a second training run.', workdir)

  def __enter__(self) -> 'WorkdirLock':
    if not self._active:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(f'{self.workdir} is in use by another training run ({_describe(self._read())}); '
                               'wait for it to finish, stop it, or choose another --workdir') from None
    previous = self._read()
    if previous:
      logging.warning('Taking over the workdir lock of a run that did not release it (%s).', _describe(previous))
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def _read(self) -> dict:
    try:
      with open(self.path) as f:
        text = f.read().strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # an empty record = released cleanly
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
