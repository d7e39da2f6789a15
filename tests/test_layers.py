"""The package's layers (docs/DESIGN.md): a module imports only its own layer and those below it, and never
imports a module just for one of its exception classes (those live in `ddpm_jax.errors`)."""

import ast
import importlib
import os
import pathlib
import pkgutil

import pytest

import ddpm_jax

# Bottom to top, as docs/DESIGN.md draws them. A module may import modules of its own layer or a lower one.
LAYERS = (
    ('foundations', ('errors', 'atomic_write', 'cache_home', 'console', 'images', 'random_streams', 'sharding', 'schedules',
                     'torch_checkpoint', 'tensorboard_writer', 'workdir_lock', 'default_config',
                     'command_line')),
    ('math', ('diffusion', 'likelihood', 'losses', 'samplers')),
    ('components', ('models', 'data', 'input_pipeline', 'evaluation', 'checkpointing', 'compilation_cache')),
    ('config', ('config_validation', 'workdir_config')),
    ('steps', ('train_state', 'sample', 'bits_per_dim', 'figure_data', 'figure_plots')),
    ('modes', ('train', 'evaluate', 'figures', 'convert', 'export')),
    ('dispatch', ('run',)),
)
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
PACKAGE_DIR = os.path.dirname(ddpm_jax.__file__)


def _modules():
  return sorted(m.name for m in pkgutil.walk_packages([PACKAGE_DIR], 'ddpm_jax.'))


def _top(module: str) -> str:
  """'ddpm_jax.models.unet' -> 'models' (a subpackage is one unit of its layer)."""
  return module.split('.')[1]


def _imports(module: str) -> dict[str, set[str]]:
  """{imported ddpm_jax module: names used from it} for `module`'s source ('*' = the module itself is bound)."""
  path = importlib.util.find_spec(module).origin
  tree = ast.parse(pathlib.Path(path).read_text())
  out: dict[str, set[str]] = {}
  bound: dict[str, str] = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('ddpm_jax'):
      for alias in node.names:
        candidate = f'{node.module}.{alias.name}'
        if importlib.util.find_spec(node.module) and _is_module(candidate):
          out.setdefault(candidate, set())
          bound[alias.asname or alias.name] = candidate
        else:
          out.setdefault(node.module, set()).add(alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('ddpm_jax.'):
          out.setdefault(alias.name, set())
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
      out[bound[node.value.id]].add(node.attr)
  return out


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def test_every_module_has_a_layer():
  assert sorted({_top(m) for m in _modules()} - set(LAYER_OF)) == []


@pytest.mark.parametrize('module', _modules())
def test_no_upward_imports(module):
  mine = LAYER_OF[_top(module)]
  upward = [f'{other} (layer {LAYERS[LAYER_OF[_top(other)]][0]})' for other in _imports(module)
            if other != 'ddpm_jax' and LAYER_OF[_top(other)] > mine]
  assert not upward, f'{module} (layer {LAYERS[mine][0]}) imports {upward}'


@pytest.mark.parametrize('module', _modules())
def test_no_module_is_imported_only_for_an_exception_class(module):
  offenders = []
  for other, names in _imports(module).items():
    if other in ('ddpm_jax', 'ddpm_jax.errors') or not names or other.startswith(module + '.'):
      continue  # (a package re-exporting its own submodules' exceptions is its public interface)
    imported = importlib.import_module(other)
    values = [getattr(imported, n, None) for n in names]
    if all(isinstance(v, type) and issubclass(v, BaseException) for v in values):
      offenders.append(f'{other} for {sorted(names)}')
  assert not offenders, f'{module} imports {offenders}: import exceptions from ddpm_jax.errors'
