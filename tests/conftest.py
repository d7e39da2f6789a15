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
