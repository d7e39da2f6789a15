"""Assertions shared by test modules."""

import pytest


def assert_one_line_error(fn, *needles, error=ValueError):
  """`fn()` raises `error` with a one-line message containing every needle (the field and the allowed values)."""
  with pytest.raises(error) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message, (needle, message)
