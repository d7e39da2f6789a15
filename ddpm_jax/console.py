"""The console: what a person running ddpm_jax reads, and how long things will take.

By default only ddpm_jax's own log lines are printed (as `HH:MM:SS message`), plus warnings and errors of other
libraries that are not known chatter. orbax, absl, TensorFlow, clu and jax's backend-probing INFO lines appear with
`--verbosity=1` (absl's flag), in absl's usual format.

`Throughput` measures the rate on completed work only (the first unit, which includes compilation, is excluded) and
turns it into an ETA; `ProgressLog` says when a progress line is due and writes its rate and ETA;
`format_duration` is the one way durations are written.
"""

from __future__ import annotations

import logging as std_logging
import os
import time
from typing import Optional

from absl import logging

# Progress lines of a long phase are logged at most this often (and when the first ETA is known, and at the end).
PROGRESS_LOG_SECONDS = 10.0

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MAIN = os.path.join(os.path.dirname(_PACKAGE_DIR), 'main.py')
# Third-party warnings that say nothing a researcher can act on.
_CHATTER = (
    'Unable to initialize backend',           # jax probing for TPU/GPU on a CPU machine
    'An NVIDIA GPU may be present',           # jax, same
    'Event loop is closed',                   # orbax/tensorstore shutdown after a failed restore
    'Closing _NonBlockingMetadataStore',
    'Waiting for previous save to complete',  # orbax: a save while the previous one is still being written
    'Variant folder',                         # tfds probing a data dir for an unprepared dataset (we name it)
)
# Packages whose warnings are about their own mechanics (orbax: "Given directory is read only", "Item 'data' was
# found in the checkpoint, but could not be restored" when only the parameters are read), not about the run; their
# errors still show.
_CHATTY_PACKAGES = ('orbax',)
# Loggers whose records never carry user-facing information below ERROR.
_QUIET_LOGGERS = ('jax._src.xla_bridge', 'orbax', 'absl', 'tensorflow', 'grain', 'asyncio', 'clu')


class _ConsoleFilter(std_logging.Filter):
  """Passes ddpm_jax's records, and third-party warnings that are not known chatter."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = os.path.abspath(record.pathname or '')
    ours = path.startswith(_PACKAGE_DIR + os.sep) or path == _MAIN
    if ours:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    if record.levelno < std_logging.ERROR and any(f'{os.sep}{p}{os.sep}' in path for p in _CHATTY_PACKAGES):
      return False
    message = record.getMessage()
    return not any(text in message for text in _CHATTER)


class _ShortFormatter(std_logging.Formatter):
  """`HH:MM:SS message`; warnings and errors say so."""

  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(record.created))
    level = '' if record.levelno < std_logging.WARNING else f'{record.levelname.lower()}: '
    return f'{stamp} {level}{record.getMessage()}'


def setup(verbosity: int = 0, handler: Optional[std_logging.Handler] = None) -> None:
  """Configures the console (absl's handler, or `handler`); `verbosity >= 1` keeps every library's logs as they are."""
  if verbosity >= 1:
    return
  handler = handler or logging.get_absl_handler()
  handler.addFilter(_ConsoleFilter())
  handler.setFormatter(_ShortFormatter())
  # Python-logging records of these libraries go through the same handler; stop INFO chatter at its source too.
  for name in _QUIET_LOGGERS:
    if name != 'absl':
      std_logging.getLogger(name).setLevel(std_logging.WARNING)


def format_duration(seconds: Optional[float]) -> str:
  """`2h05m`, `3m07s`, `42s`, `0.8s`; '?' when unknown."""
  if seconds is None or seconds != seconds or seconds < 0:
    return '?'
  if seconds < 10:
    return f'{seconds:.1f}s'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


class Throughput:
  """Rate of completed units (steps, batches, timestep chunks) and the time left for `total`.

  `start(done)` marks the first completed unit (its time includes compilation and is not counted); `update(done)`
  after each later completed unit. Before two completions the rate and ETA are unknown (None).
  """

  def __init__(self, total: int, clock=time.monotonic):
    self.total = total
    self._clock = clock
    self._first: Optional[tuple[int, float]] = None
    self._last: Optional[tuple[int, float]] = None

  def update(self, done: int) -> None:
    now = self._clock()
    if self._first is None:
      self._first = (done, now)
    self._last = (done, now)

  @property
  def rate(self) -> Optional[float]:
    """Units per second over the completed units after the first."""
    if self._first is None or self._last is None or self._last[0] <= self._first[0]:
      return None
    elapsed = self._last[1] - self._first[1]
    return (self._last[0] - self._first[0]) / elapsed if elapsed > 0 else None

  def eta(self) -> Optional[float]:
    """Seconds until `total`, at the measured rate."""
    rate = self.rate
    if rate is None or self._last is None:
      return None
    return max(0, self.total - self._last[0]) / rate


class ProgressLog:
  """When to log a progress line of a phase of `total` units, and its rate and ETA (`Throughput`, which
  leaves out the first unit, compilation included). Due at most every `PROGRESS_LOG_SECONDS`, as soon as an ETA
  is known and at the last unit, so a phase of many fast units does not flood the console."""

  def __init__(self, total: int):
    self.throughput = Throughput(total)
    self._start = self._last_log = time.monotonic()
    self._eta_logged = False

  def due(self, done: int) -> bool:
    """Records that `done` units are complete; True if a line should be logged now."""
    self.throughput.update(done)
    now = time.monotonic()
    first_eta = not self._eta_logged and self.throughput.rate is not None
    if first_eta or done >= self.throughput.total or now - self._last_log >= PROGRESS_LOG_SECONDS:
      self._last_log = now
      self._eta_logged = self._eta_logged or first_eta
      return True
    return False

  def rate(self, items_per_unit: int = 1, item: str = 'batch', items: str = 'batches') -> str:
    """`16s/batch` below one item per second, else `3.2 batches/s`; before the rate is known (one unit done), the
    time so far, which includes compilation."""
    rate = self.throughput.rate
    if rate is None:
      return f'{format_duration(time.monotonic() - self._start)} with compilation'
    rate *= items_per_unit
    return f'{format_duration(1 / rate)}/{item}' if rate < 1 else f'{rate:.3g} {items}/s'

  def eta(self) -> str:
    return format_duration(self.throughput.eta())
