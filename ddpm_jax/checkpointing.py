"""Checkpoints: one orbax `CheckpointManager` per workdir, for training and for inference.

Layout: `<workdir>/checkpoints/<step>/` with the items
  `state`  the train state as a pytree (step, params, ema_params, opt_state, t_sampler), or for an
           inference-only checkpoint (e.g. converted released weights) just {step, params, ema_params};
  `data`   the grain training-iterator state (absent from inference-only checkpoints).
Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save never
leaves a half-written step that looks finished (the temporary directory stays, ignored). A step that is there but
cannot be read (truncated or deleted files, an empty directory: disk trouble, a copy gone wrong) is never deleted:
training moves it to `<step>.unreadable` and resumes from the newest readable step; sampling and evaluation skip it
and never write into `checkpoints/`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.errors import UserError, one_line

STATE_ITEM = 'state'
DATA_ITEM = 'data'


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No (readable) checkpoint where one was required."""


class CheckpointMismatchError(UserError):
  """A readable checkpoint holds a state of another shape: the run was started with another config."""


def checkpoint_dir(workdir: str) -> str:
  """Directory holding the numbered step directories of `workdir`."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, keep: Optional[int] = None, *, read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax `CheckpointManager` on `<workdir>/checkpoints` keeping the newest `keep` steps (None = all)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
  # Read-only managers restore the `state` item without a target (partial, NumPy), which needs its handler named.
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler()} if read_only else None
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


# A top-level state entry of checkpoints written before the train key left the state (it is derived from the
# seed and the step now). Such checkpoints still resume: the entry is not read.
LEGACY_STATE_KEYS = ('rng',)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_save_args: Any = None,
         *, force: bool = False) -> bool:
  """Saves `state` (and the data iterator, when given) at `step`; asynchronous, call `wait` before exiting."""
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_save_args is not None:
    items[DATA_ITEM] = data_save_args
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _reason(e: BaseException) -> str:
  """One line saying why a step could not be read."""
  return one_line(e, 200).split(' See full TensorStore details')[0]  # the rest is a pybind repr, no explanation


def _ignore_closed_event_loop_reports() -> None:
  """After a failed restore, tensorstore still completes the reads of the other arrays and posts each result to
  orbax's event loop, which is closed by then: every post is reported as an unraisable `RuntimeError('Event loop is
  closed')` with a traceback (hundreds for one truncated file). They carry no information; other reports pass."""
  previous = sys.unraisablehook
  if getattr(previous, 'ddpm_jax_filter', False):
    return

  def hook(report):
    if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == 'Event loop is closed':
      return
    previous(report)

  hook.ddpm_jax_filter = True
  sys.unraisablehook = hook


def move_aside(workdir: str, step: int, reason: str) -> str:
  """Renames `checkpoints/<step>` to `checkpoints/<step>.unreadable` (then `.unreadable-2`, ...); never deletes.

  Orbax lists only directories named by a step number, so the renamed one is ignored from then on and the step can
  be written again. Returns the new path.
  """
  source = os.path.join(checkpoint_dir(workdir), str(step))
  target = f'{source}.unreadable'
  n = 1
  while os.path.exists(target):
    n += 1
    target = f'{source}.unreadable-{n}'
  os.rename(source, target)
  logging.warning('Checkpoint step %d is unreadable (%s); moved it to %s.', step, reason, target)
  return target


def _path_key(path) -> tuple[str, ...]:
  """A pytree key path as strings, the same for a dict, a (named) tuple or orbax's stored form of either."""
  return tuple(str(next(getattr(k, a) for a in ('key', 'idx', 'name') if hasattr(k, a))) for k in path)


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_key(path): tuple(leaf.shape) for path, leaf in leaves}


def _state_mismatch(reader: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[Optional[str], bool]:
  """(How the stored state of `step` differs in structure or shapes from `abstract` (None: it fits), whether it has
  `LEGACY_STATE_KEYS` to leave unread).

  Reads metadata only. Raises (any exception) when the metadata itself cannot be read: that is corruption, not a
  mismatch. A mismatch means the run was resumed with another config (architecture, optimizer, t sampling), which
  must stop the run rather than have its checkpoints moved aside as unreadable.
  """
  metadata = reader.item_metadata(step)[STATE_ITEM]
  if metadata is None:
    raise ValueError('the state item has no metadata')
  stored, wanted = _shapes(metadata), _shapes(abstract)
  legacy = {key for key in stored if key[0] in LEGACY_STATE_KEYS and key not in wanted}
  for key in sorted((set(stored) - legacy) | set(wanted)):
    name = '/'.join(key)
    if key not in stored:
      return f'{name} is not in the checkpoint', False
    if key not in wanted:
      return f'the checkpoint has {name}, which this config does not', False
    if stored[key] != wanted[key]:
      return f'{name} has shape {stored[key]} in the checkpoint and {wanted[key]} with this config', False
  return None, bool(legacy)


def restore_latest(workdir: str, keep: Optional[int], target_state: Any,
                   data_restore_args_fn: Optional[Callable[[], Any]] = None
                   ) -> tuple[ocp.CheckpointManager, Optional[int], Any]:
  """Opens the training `CheckpointManager` of `workdir` and restores its newest readable step.

  A step that cannot be restored (truncated or missing files, an empty directory) is moved aside (`move_aside`) by
  process 0 and the next older one is tried, so a corrupt checkpoint costs at most the steps since the previous one
  and never stops the run: it resumes, saves that step number again later, and a restart finds the same state.

  Returns (manager, step, state), or (manager, None, target_state) when no readable checkpoint exists.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  _ignore_closed_event_loop_reports()  # before reading: the reports can come before the failure is raised
  manager = create_manager(workdir, keep)
  reader = create_manager(workdir, read_only=True) if manager.all_steps() else None  # metadata without a target
  moved = False
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
      if data_restore_args_fn is not None:
        items[DATA_ITEM] = data_restore_args_fn()
      try:
        mismatch, legacy = _state_mismatch(reader, step, abstract)
        if mismatch is None and legacy:
          # Partial restore needs the PyTree handler; `manager` keeps the Standard one for its saves.
          restored = reader.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True)}))
          if DATA_ITEM in items:
            restored = {**restored, **manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: items[DATA_ITEM]}))}
        elif mismatch is None:
          restored = manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except  (any failure to read means: not this step)
        if jax.process_index() == 0:
          move_aside(workdir, step, _reason(e))
        moved = True
        continue
      if mismatch is not None:
        raise CheckpointMismatchError(
            f'the checkpoint at step {step} in {checkpoint_dir(workdir)} was written with another config: '
            f'{mismatch}. Resume with the config this run was started with ({os.path.join(workdir, "config.json")}'
            ' and the same overrides), or use a new --workdir')
      return _reopen(manager, workdir, keep, moved), step, restored[STATE_ITEM]
    return _reopen(manager, workdir, keep, moved), None, target_state
  except BaseException:
    manager.close()
    raise
  finally:
    if reader is not None:
      reader.close()


def _reopen(manager: ocp.CheckpointManager, workdir: str, keep: Optional[int], moved: bool) -> ocp.CheckpointManager:
  """After steps were moved aside, a fresh manager (its step list is read when it is created)."""
  if not moved:
    return manager
  manager.close()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('ddpm_jax: unreadable checkpoints moved aside')
  return create_manager(workdir, keep)


def save_inference_checkpoint(workdir: str, step: int, params: Any, ema_params: Any) -> str:
  """Writes an inference-only checkpoint ({step, params, ema_params}) that --mode=sample/eval can load."""
  manager = create_manager(workdir)
  tree = {'step': np.asarray(step, np.int64), 'params': params, 'ema_params': ema_params}
  manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree)}), force=True)
  manager.wait_until_finished()
  manager.close()
  return os.path.join(checkpoint_dir(workdir), str(step))


def available_steps(workdir: str) -> Sequence[int]:
  """Checkpointed steps of `workdir`, ascending (empty when there are none)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  manager = create_manager(workdir, read_only=True)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def require_checkpoint(workdir: str, step: Optional[int] = None) -> Sequence[int]:
  """`available_steps(workdir)`, raising `CheckpointNotFoundError` when there are none or `step` is not one of them."""
  steps = available_steps(workdir)
  if not steps:
    raise CheckpointNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}: train first, or convert released '
                                  'weights with `python -m ddpm_jax.convert`')
  if step is not None and step not in steps:
    raise CheckpointNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; available: {steps}')
  return steps


def restore_inference_params(workdir: str, step: Optional[int] = None) -> tuple[int, Any, Any]:
  """Loads (step, params, ema_params) as NumPy pytrees from a training or inference checkpoint.

  `step=None` picks the newest readable checkpoint (falling back past unreadable ones, as training does).
  """
  steps = require_checkpoint(workdir, step)
  manager = create_manager(workdir, read_only=True)
  try:
    for candidate in ([step] if step is not None else sorted(steps, reverse=True)):
      try:
        # Only the parameters are read: the optimizer state of a training checkpoint is never loaded.
        metadata = manager.item_metadata(candidate)[STATE_ITEM]
        wanted = {k: metadata[k] for k in ('params', 'ema_params')}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = manager.restore(candidate, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)}))
      except Exception as e:  # pylint: disable=broad-except
        _ignore_closed_event_loop_reports()
        if step is not None:
          raise
        logging.warning('Checkpoint step %d is unreadable (%s); using the previous one.', candidate, _reason(e))
        continue
      tree = restored[STATE_ITEM]
      return int(candidate), tree['params'], tree['ema_params']
  finally:
    manager.close()
  raise CheckpointNotFoundError(f'no readable checkpoint in {checkpoint_dir(workdir)}')
