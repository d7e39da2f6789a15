"""One-line errors for the commands (`main.py`, `ddpm_jax.convert`, `ddpm_jax.export`, `ddpm_jax.figures`).

A mistyped flag, a config file that does not load, an override of a field the config lacks, a stray argument, or
any `UserError` further on: `<program>: error: <one line>` on stderr and exit code 2, no traceback, before anything
is built; a Ctrl-C is one line and exit code 130 (`run_interruptible`). Imports only absl and `errors`, so a wrong
flag is reported before jax is even imported.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import flags

from ddpm_jax.errors import UserError

USAGE_ERROR_EXIT = 2
INTERRUPTED_EXIT = 128 + 2  # the shell's code for a program stopped by SIGINT (Ctrl-C)


def error_line(program: str, message: object) -> str:
  return f'{program}: error: {" ".join(str(message).split())}'


def report(program: str, message: object, code: int = USAGE_ERROR_EXIT) -> int:
  """Prints the one line on stderr; returns `code` (for a `main` that returns its exit code)."""
  print(error_line(program, message), file=sys.stderr)
  return code


def fail(program: str, message: object, code: int = USAGE_ERROR_EXIT) -> NoReturn:
  sys.exit(report(program, message, code))


def run_interruptible(program: str, command: Callable[[], Any], after: str = '') -> Any:
  """`command()`, with a Ctrl-C (KeyboardInterrupt) as one line `<program>: error: interrupted (Ctrl-C)<after>` and
  exit code 130 instead of a traceback."""
  try:
    return command()
  except KeyboardInterrupt:
    fail(program, f'interrupted (Ctrl-C){after}', code=INTERRUPTED_EXIT)


def config_arg(argv: Sequence[str]) -> str:
  """The config file as given (`--config=FILE` or `--config FILE`), '?' when none is."""
  given = '?'
  for a, following in zip(argv, list(argv[1:]) + ['']):
    if a.startswith('--config='):
      given = a.split('=', 1)[1]
    elif a == '--config':
      given = following
  return given


def _root_cause(e: BaseException) -> str:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f'{type(e).__name__}: {lines[-1] if lines else ""}'.rstrip(': ')


def parse_error_message(e: BaseException, argv: Sequence[str]) -> str:
  """The one line for an exception raised while parsing `argv` or loading the config file it names."""
  config = config_arg(argv)
  if isinstance(e, flags.Error):
    first = (str(e).splitlines() or [type(e).__name__])[0]
    if "Unknown command line flag 'config." in first and config == '?':
      override = first.split("'")[1]
      return (f'--{override}: overrides apply to a config file, and no --config is given; pass one before them '
              '(for --mode=sample/eval the run\'s recorded config: --config=configs/workdir.py:WORKDIR)')
    if 'Error whilst parsing config file' not in first:  # else the file raised: ml_collections quotes a traceback
      return f'{first} (see --help)'
  elif isinstance(e, (KeyError, AttributeError)):  # an override of a field the config does not have
    # ml_collections raises AttributeError(KeyError("'field'\nDid you mean ...?")) or the KeyError itself.
    cause = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
    key, *hint = str(cause.args[0] if cause.args else cause).splitlines() or ['?']
    key = key.strip('\'"')
    overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
    named = [o for o in overrides if key in o[len('--config.'):].split('.')] or overrides
    if named:
      return (f'{" / ".join(named)}: the config from --config={config} has no field {key!r}'
              f'{" (" + " ".join(h.strip() for h in hint) + ")" if hint else ""}; every field is listed, with what '
              'it does, in ddpm_jax/default_config.py')
  return f'--config={config}: cannot load the config file ({_root_cause(e)})'


def parse(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """`flag_values(argv)` (argv[0] is the program), the config file (if a `config` flag is given) loaded, and no
  arguments left over; every mistake is a one-line `UserError`. Returns [argv[0]] (what absl's app.run expects)."""
  try:
    rest = flag_values(list(argv))
    if 'config' in flag_values and flag_values['config'].present and flag_values.config is not None:
      flag_values.config.to_dict()  # a file that failed to load leaves a placeholder that raises on first use
  except Exception as e:  # pylint: disable=broad-except  (the config file is user code: anything can come out)
    raise UserError(parse_error_message(e, argv)) from None
  if rest[1:]:
    raise UserError(f'unexpected arguments: {rest[1:]} (flags are --name=value)')
  return rest[:1]


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """`app.run(main, flags_parser=...)` for absl's global FLAGS: `parse`, each mistake one line and exit 2."""
  def parse_global_flags(argv: list[str]) -> list[str]:
    try:
      return parse(flags.FLAGS, argv)
    except UserError as e:
      fail(program, e)
  return parse_global_flags
