"""Eight CPU devices for the multi-device tests (jformer.parallel).

XLA reads the flag once, when jax initialises its backends, so it is set here,
before any test module imports jax. Single-device code is unaffected: arrays
live on device 0 unless sharded.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()
