"""Entry point: ``python -m fedalign.main --config=configs/<name>.py --workdir=DIR``.

Any config field can be overridden with ``--config.KEY=VALUE`` (ml_collections), e.g.
``--config.method=fedalign --config.data.alpha=1.0 --config.train.rounds=25``. Running the
same command with the same workdir resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from fedalign.config_files import define_config_flag

_CONFIG = define_config_flag("config", "Path to a get_config() file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, plots.")
_CACHE = flags.DEFINE_bool(
    "compilation_cache",
    True,
    "Keep JAX's compiled programs on disk, so that rerunning or resuming a run does not "
    "recompile (--nocompilation_cache: off).",
)
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Directory of the compilation cache (default: $FEDALIGN_COMPILATION_CACHE or "
    "~/.cache/fedalign/jax).",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host TPU pods, multi-node GPUs; "
    "FEDALIGN_COORDINATOR=host:port, FEDALIGN_NUM_PROCESSES, FEDALIGN_PROCESS_ID, "
    "FEDALIGN_INIT_TIMEOUT or auto-detection); see docs/scaling.md.",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
  if _CACHE.value:
    from fedalign.compilation import enable_compilation_cache

    logging.info("compilation cache: %s", enable_compilation_cache(_CACHE_DIR.value))
  if _DISTRIBUTED.value:
    from fedalign.federated.distributed import initialize

    initialize()
  from fedalign.federated.server import run_experiment

  summary = run_experiment(_CONFIG.value, _WORKDIR.value)
  import jax

  if jax.process_index() != 0:  # process 0 reports (and wrote summary.json)
    return
  print(
      f"final_test_accuracy={summary['final_test_accuracy']:.4f} "
      f"best_test_accuracy={summary['best_test_accuracy']:.4f} "
      f"rounds={summary['rounds']} compile_time_s={summary['compile_time_s']:.1f} "
      f"wall_time_s={summary['wall_time_s']:.1f} workdir={_WORKDIR.value}"
  )


def run() -> None:
  """Console-script entry point (``fedalign --config=... --workdir=...``)."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
