"""The console: which log lines a person sees by default, durations, and rates/ETAs on completed work only."""

import io
import logging
import os

import pytest

from ddpm_jax import console

PACKAGE = os.path.dirname(os.path.abspath(console.__file__))


def _record(path, level, message):
  return logging.LogRecord('absl', level, path, 1, message, None, None)


def test_default_console_shows_our_lines_and_real_warnings_only():
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  console.setup(0, handler)
  for path, level, message in [
      (os.path.join(PACKAGE, 'train.py'), logging.INFO, 'Step 100/2800 (3%): loss 0.5'),
      ('/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.INFO, 'Saving checkpoint at step 4'),
      ('/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.WARNING, 'Given directory is read only'),
      ('/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.ERROR, 'save failed: disk full'),
      ('/site-packages/jax/_src/xla_bridge.py', logging.INFO, "Unable to initialize backend 'tpu'"),
      ('/site-packages/jax/_src/xla_bridge.py', logging.WARNING, "Unable to initialize backend 'tpu'"),
      ('/site-packages/jax/_src/config.py', logging.WARNING, 'jax_enable_x64 is deprecated'),
      (os.path.join(PACKAGE, 'checkpointing.py'), logging.WARNING, 'Checkpoint step 6 is unreadable'),
  ]:
    handler.handle(_record(path, level, message))
  shown = [line.split(' ', 1)[1] for line in stream.getvalue().splitlines()]  # without the HH:MM:SS stamp
  assert shown == ['Step 100/2800 (3%): loss 0.5', 'error: save failed: disk full',
                   'warning: jax_enable_x64 is deprecated', 'warning: Checkpoint step 6 is unreadable']


def test_verbosity_1_keeps_every_line():
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  console.setup(1, handler)
  handler.handle(_record('/site-packages/orbax/checkpoint/checkpoint_manager.py', logging.INFO, 'Saving'))
  assert stream.getvalue() == 'Saving\n'


@pytest.mark.parametrize('seconds,text', [(None, '?'), (-1, '?'), (0.84, '0.8s'), (42.4, '42s'), (187, '3m07s'),
                                          (7500, '2h05m'), (float('nan'), '?')])
def test_format_duration(seconds, text):
  assert console.format_duration(seconds) == text


def test_throughput_leaves_out_the_first_unit_and_gives_the_eta():
  now = [0.0]
  meter = console.Throughput(total=100, clock=lambda: now[0])
  assert meter.rate is None and meter.eta() is None
  now[0] = 30.0  # the first step: 30 s of compiling
  meter.update(1)
  assert meter.rate is None and meter.eta() is None
  now[0] = 40.0  # 10 more steps in 10 s
  meter.update(11)
  assert meter.rate == pytest.approx(1.0)
  assert meter.eta() == pytest.approx(89.0)
  now[0] = 50.0
  meter.update(31)  # 30 steps in 20 s since the first
  assert meter.rate == pytest.approx(1.5) and meter.eta() == pytest.approx(69 / 1.5)
