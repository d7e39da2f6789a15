"""Test-session setup: fake CPU devices for sharding tests, and the torchvision stub the oracles need."""

import os
import sys
import types

# Must happen before jax is imported anywhere: 8 host devices let sharding/pmap tests run on a CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# torchvision 0.28's C ops cannot load on this CPU build of torch; its `_meta_registrations` import is the part that
# fails, and nothing we use from it (diffusers, pytorch-fid) needs it. An empty module lets the import succeed.
sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import tempfile  # pylint: disable=g-import-not-at-top,g-bad-import-order

# Identical programs compiled by several tests (and their subprocesses, which inherit the environment) are read back
# from a per-session persistent cache instead of being compiled again.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='ddpm_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
