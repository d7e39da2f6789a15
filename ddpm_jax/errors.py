"""The errors a person can fix: printed by `main.py` as one line `ddpm_jax: error: ...`, exit code 2, no traceback.

They live here, below every other module, so that checkpointing, data sources or the Inception weights can raise
them without importing the config validator.
"""


def one_line(e: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message` (at most `limit` characters), for quoting an exception inside a one-line
  error or warning."""
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[0].strip()[:limit]}' if lines else type(e).__name__


class UserError(Exception):
  """An error in what the user asked for (config, data, checkpoint, workdir): one line, no traceback."""


class ConfigError(UserError, ValueError):
  """A config field holds a value that is not allowed. The message is one line naming the field."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used (not writable, not a directory)."""


def workdir_missing(workdir: str) -> WorkdirError:
  """The error for sampling, evaluating or exporting a `workdir` that does not exist."""
  return WorkdirError(f'--workdir={workdir} does not exist: train first (--mode=train), or convert released '
                      'weights with `python -m ddpm_jax.convert`')


class TrainingDivergedError(RuntimeError):
  """Training diverged (a streak of non-finite updates): the run stops, keeping its last good checkpoint.

  Not a `UserError` (exit code 1, not 2), but also printed as one line without a traceback.
  """
