"""What a measurement ran on: one description shared by benchmarks, experiment tables and the
PyTorch comparison.

>>> info = describe()
>>> sorted(info)[:3]
['arch', 'backend', 'cores']
"""

from __future__ import annotations

import os
import pathlib
import platform
from typing import Any


def cpu_name() -> str:
  """The CPU model of /proc/cpuinfo (``platform.processor()`` or the architecture elsewhere)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
  """CPU, architecture, cores, Python, JAX version, backend and devices of this process."""
  import jax

  return {
      "cpu": cpu_name(),
      "arch": platform.machine(),
      "cores": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": len(jax.devices()),
      "device_kinds": sorted({d.device_kind for d in jax.devices()}),
  }
