"""Shared helpers of the benchmark scripts: machine description, timing, tables, JSON output."""

from __future__ import annotations

import os
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import jax

from fedalign import reports
from fedalign.reports import fmt, markdown_table  # noqa: F401 (re-exported)

# FEDALIGN_BENCHMARK_RESULTS: another folder for the results JSONs (smoke runs, tests)
RESULTS_DIR = pathlib.Path(
    os.environ.get(
        "FEDALIGN_BENCHMARK_RESULTS", pathlib.Path(__file__).resolve().parent / "results"
    )
)


def machine() -> dict[str, Any]:
  """What the numbers were measured on (CPU model, cores, JAX version, devices)."""
  from fedalign.hardware import describe

  return {**describe(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def accelerator(info: dict[str, Any]) -> str:
  """'no GPU' on the CPU backend, else the devices, for the tables' machine line.

  >>> accelerator({"backend": "cpu", "devices": 1, "device_kinds": ["cpu"]})
  'no GPU'
  >>> accelerator({"backend": "gpu", "devices": 1, "device_kinds": ["NVIDIA H200"]})
  '1 x NVIDIA H200 (gpu)'
  """
  if info.get("backend") == "cpu":
    return "no GPU"
  return (
      f"{info.get('devices')} x {', '.join(info.get('device_kinds', []))} ({info.get('backend')})"
  )


def mem_available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (None where unknown)."""
  try:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
  """Calls fn once (warm-up: trace + compile + run), then reps times.

  Returns (first call seconds, list of steady-state seconds). fn must block on its result.
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def write_json(name: str, payload: dict[str, Any]) -> pathlib.Path:
  """benchmarks/results/NAME (the JSON every table of benchmarks/ is rendered from)."""
  return reports.write_json(RESULTS_DIR / name, payload)


def load_config_with_overrides(path: str, overrides: Sequence[str]) -> Any:
  """``load_config(path)`` with ``key.sub=value`` overrides (typed like the field), validated."""
  from fedalign.config_files import load_config
  from fedalign.federated.config_checks import validate_config

  cfg = load_config(path)
  for kv in overrides:
    key, value = kv.split("=", 1)
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = value.lower() == "true" if isinstance(old, bool) else type(old)(value)
  validate_config(cfg)
  return cfg
