"""`python tests/run_main_under_mock_data.py <main.py flags>`: main.py with TFDS mock data (subprocess tests).

Used to test what only a separate process can show: SIGKILL/SIGTERM/Ctrl-C handling and multi-process training.
The device count comes from XLA_FLAGS set by the caller.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

import main as main_lib

MOCK_EXAMPLES = 64

if __name__ == '__main__':
  # Ctrl-C as in a terminal: a process started in the background (by a test runner, `cmd &`) inherits SIGINT ignored.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    main_lib.entry()
