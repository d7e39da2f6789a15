"""Files written so that a reader finds the old version or the new one, never a truncated mix.

A run killed (or preempted) mid-write must not leave a half-written `config.json`, evaluation progress file, cached
FID statistics or downloaded weights under the real name, where the next run would read it as valid; two processes
writing the same file at once must not write into one temporary file.
"""

from __future__ import annotations

import os
import secrets
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` to write the whole file at a temporary path beside `path`, then renames it onto `path`.

  The rename (`os.replace`) is atomic on POSIX file systems. The temporary name is this call's own (process id and
  a random part), so concurrent writers never share one, and it keeps `path`'s extension, because `np.save` /
  `np.savez` append `.npy` / `.npz` to a name without it. `write` creates the file as `open()` does, so it gets
  the usual permissions (0666 less the umask). The parent directory is created if needed. If `write` raises (for
  example because what it wrote fails a check), the temporary file is removed and `path` is left as it was.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp{os.path.splitext(path)[1]}'
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
