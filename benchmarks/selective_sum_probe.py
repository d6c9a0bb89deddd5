"""How close can the O(N) FedAlign-MoE expert aggregation get to FedAvg on this CPU? A probe.

Command (2-core CPU: about a minute; needs g++)::

    python benchmarks/selective_sum_probe.py [--clients 1000] [--experts 64] [--reps 7]

The O(N) aggregate reads the deltas four times in XLA (consensus, squared norms, dot products
with the consensus, final weighted sum: ``consensus_expert_cosine`` then ``expert_sum``),
where FedAvg's einsum reads them once. With its exact arithmetic it needs two reads at least
(the dot products need the whole consensus; each client's score needs only its own dot
product, so the weighted sum can be accumulated in the same read and the excluded pairs
subtracted afterwards: benchmarks/README.md section 2), but XLA:CPU runs the reductions of a
loop body about 3x slower than top-level ones, so that formulation loses there.

This probe measures the two-read formulation as hand-written C++ passes
(``benchmarks/probes/selective_sum.cc``, compiled here with ``g++ -O3 -march=native``, called
through ctypes on NumPy copies of the deltas; not part of the library):
pass 1 (consensus and squared norms), pass 2 (dot products, scores, the weighted sum over
P(e)), pass 3 (the excluded pairs' rows subtracted). Timed in the same rounds: FedAvg's sum
(``client_sum`` of the 3 leaves) and the library's XLA path for the same quantities
(``consensus_expert_cosine`` + ``expert_sum``). The rest of the aggregate (router merge, gate,
selection, statistics: about 35 ms at 1000 x 64, ``profile_aggregation.py``) is in neither.

Checks: the probe's scores against the XLA path's (same formula), and its sums against
``expert_sum`` with the weights its scores give. Sizes: 3 expert leaves (C, E, 64, 64), every
7th client not taking part, counts with ~20% of (client, expert) pairs outside
P(e), gate values uniform in (0, 1), beta = 1.
Results: a markdown table and benchmarks/results/selective_sum_probe.json.
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import accelerator, machine, markdown_table, median, write_json  # noqa: E402
from fedalign.aggregation.moe_blocks import client_sum, expert_sum  # noqa: E402
from fedalign.algorithms.fedalign import consensus_expert_cosine  # noqa: E402

SOURCE = REPO / "benchmarks" / "probes" / "selective_sum.cc"
D = F = 64
BETA, TOL = 1.0, 1e-6


def build(out_dir: pathlib.Path) -> ctypes.CDLL:
  """Compiles the probe's passes with g++ (an error naming what is missing if there is none)."""
  cxx = shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise SystemExit("selective_sum_probe: needs a C++ compiler (g++ or c++) on PATH")
  lib = out_dir / "selective_sum.so"
  cmd = [cxx, "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(lib)]
  subprocess.run(cmd + [str(SOURCE), "-lpthread"], check=True)
  return ctypes.CDLL(str(lib))


def selection(score: np.ndarray, cnt: np.ndarray, part: np.ndarray):
  """A(e) = {S >= M(e) - beta Sigma(e)} over P(e) (4.3), as fedalign.algorithms.fedalign."""
  sel = (cnt > 0) & part[:, None]
  n_sel = sel.sum(0)
  s = np.where(sel, score, 0.0)
  mean = s.sum(0) / np.maximum(n_sel, 1)
  var = (sel * (s - mean) ** 2).sum(0) / np.maximum(n_sel, 1)
  in_a = sel & (s >= mean - BETA * np.sqrt(var) - TOL)
  return sel, in_a


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=1000)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--tag", default="", help="results file selective_sum_probe_TAG.json")
  args = p.parse_args()
  c, e = args.clients, args.experts
  k = jax.random.split(jax.random.key(0), 6)
  part = np.arange(c) % 7 != 3
  # non-participants' rows are finite (FedAvg's einsum is then one read, as in
  # aggregation_time.py); no pass reads them
  xs = [jax.random.normal(k[i], (c, e, D, F)) for i in range(3)]
  keep = np.asarray(jax.random.uniform(k[3], (c, e))) > 0.2
  cnt = np.where(part[:, None] & keep, np.asarray(jax.random.uniform(k[4], (c, e))), 0.0)
  cnt = cnt.astype(np.float32)
  gbar = np.asarray(jax.random.uniform(k[5], (c, e)), np.float32)
  v = (cnt / np.maximum(cnt.sum(0), 1e-30)).astype(np.float32)
  n_sel = ((cnt > 0).sum(0)).astype(np.float32)
  part_j = jnp.asarray(part)

  # the XLA path: FedAvg's one read, and the library's consensus cosine + weighted sum
  fedavg = jax.jit(lambda xs: [client_sum(jnp.full((c,), 1.0 / c), x, part_j) for x in xs])

  def xla_scores(xs):
    dcos = consensus_expert_cosine(xs, jnp.asarray(v), part_j)
    s = jnp.where(n_sel >= 2, jnp.asarray(gbar) * (1.0 + dcos) / 2, 1.0)
    return jnp.where(jnp.asarray(cnt) > 0, s, 0.0)

  scores_xla = jax.jit(xla_scores)
  weighted = jax.jit(lambda w, xs: expert_sum(w, xs, part_j))

  def xla_path():
    s = np.asarray(scores_xla(xs))
    _, in_a = selection(s, cnt, part)
    w = cnt * s * in_a
    w = w / np.maximum(w.sum(0), 1e-30)
    return jax.block_until_ready(weighted(jnp.asarray(w, jnp.float32), xs))

  # the probe's passes, on NumPy copies (C-contiguous float32)
  x_np = [np.ascontiguousarray(np.asarray(x).reshape(c, e, -1)) for x in xs]
  size = x_np[0].shape[2]
  fp = ctypes.POINTER(ctypes.c_float)
  ptrs = lambda arrs: (fp * len(arrs))(*[a.ctypes.data_as(fp) for a in arrs])
  ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
  sizes = (ctypes.c_int64 * 3)(size, size, size)
  x_bar = [np.zeros((e, size), np.float32) for _ in range(3)]
  acc = [np.zeros((e, size), np.float32) for _ in range(3)]
  sq, score = np.zeros((c, e), np.float32), np.zeros((c, e), np.float32)
  part_u8 = part.astype(np.uint8)
  px, pbar, pacc = ptrs(x_np), ptrs(x_bar), ptrs(acc)
  dims = (ctypes.c_int64(c), ctypes.c_int64(e))
  state = {}

  with tempfile.TemporaryDirectory() as tmp:
    lib = build(pathlib.Path(tmp))

    def pass1():
      lib.pass1(3, px, sizes, *dims, ptr(v), ptr(part_u8), pbar, ptr(sq))
      state["sq_bar"] = sum((b.astype(np.float64) ** 2).sum(1) for b in x_bar).astype(np.float32)

    def pass2():
      lib.pass2(3, px, sizes, *dims, pbar, ptr(part_u8), ptr(cnt), ptr(gbar), ptr(sq),
                ptr(state["sq_bar"]), ptr(n_sel), pacc, ptr(score))  # fmt: skip

    def pass3():
      sel, in_a = selection(score, cnt, part)
      t = cnt * score
      z = (t * in_a).sum(0)
      state["in_a"] = in_a
      coef = np.where(sel & ~in_a, -t / np.maximum(z, 1e-30), 0.0).astype(np.float32)
      scale = (1.0 / np.maximum(z, 1e-30)).astype(np.float32)
      lib.pass3(3, px, sizes, *dims, ptr(scale), ptr(coef), pacc)

    def probe():
      pass1()
      pass2()
      pass3()

    cases = {
        "FedAvg: client_sum, 3 leaves (XLA einsum)": lambda: jax.block_until_ready(fedavg(xs)),
        "O(N) in XLA: consensus_expert_cosine + selection + expert_sum": xla_path,
        "probe pass 1: consensus + squared norms (C++)": pass1,
        "probe pass 2: dots, scores, weighted sum over P(e) (C++)": pass2,
        "probe pass 3: selection + excluded rows subtracted (NumPy + C++)": pass3,
        "probe, all three passes": probe,
    }
    for fn in cases.values():  # warm-up (compiles)
      fn()
    times = {name: [] for name in cases}
    for _ in range(args.reps):
      for name, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)

    # checks: the probe's scores vs XLA's, its sums vs expert_sum with its own weights
    probe()
    s_xla = np.asarray(scores_xla(xs))
    score_err = float(np.max(np.abs(score - s_xla)))
    w = cnt * score * state["in_a"]
    w = w / np.maximum(w.sum(0), 1e-30)
    ref = weighted(jnp.asarray(w, jnp.float32), xs)
    sum_err = max(
        float(np.max(np.abs(a - np.asarray(r).reshape(e, -1))) / np.max(np.abs(np.asarray(r))))
        for a, r in zip(acc, ref)
    )
    excluded = float(((cnt > 0) & part[:, None] & ~state["in_a"]).sum() / ((cnt > 0).sum()))

  base = median(times["FedAvg: client_sum, 3 leaves (XLA einsum)"])
  rows = [
      {"case": name, "median_s": median(t), "vs_fedavg": median(t) / base, "times_s": t}
      for name, t in times.items()
  ]
  info = machine()
  command = "python " + " ".join([str(pathlib.Path(sys.argv[0]))] + sys.argv[1:])
  gb = 3 * x_np[0].nbytes / 1e9
  text = (
      "#### O(N) expert aggregation: XLA vs hand-written passes (probe)\n\n"
      f"Command: `{command}`  \nMachine: {info['cpu']} ({info['arch']}, {info['cores']} cores, "
      f"{accelerator(info)}, shared: load average {info['loadavg_at_start'][0]} at start), "
      f"JAX {info['jax']}.  \nSizes: C = {c}, E = {e}, 3 expert leaves (C, E, {D}, {F}) "
      f"({gb:.2f} GB); {100 * excluded:.1f}% of the pairs in P(e) excluded from A(e). The cases "
      f"called in turn, median of {args.reps} calls after a warm-up. Checks: scores max abs "
      f"difference {score_err:.2e}, sums max relative difference {sum_err:.2e}.\n\n"
      + markdown_table(
          ["case", "median (ms)", "x FedAvg"],
          [[r["case"], 1e3 * r["median_s"], r["vs_fedavg"]] for r in rows],
      )
  )
  print(text)
  path = write_json(
      f"selective_sum_probe{'_' + args.tag if args.tag else ''}.json",
      {
          "command": command,
          "machine": info,
          "clients": c,
          "experts": e,
          "deltas_gb": gb,
          "excluded_fraction": excluded,
          "score_max_abs_diff": score_err,
          "sum_max_rel_diff": sum_err,
          "rows": rows,
          "markdown": text,
      },
  )
  print(f"\nwrote {path}")
  if score_err > 1e-4 or sum_err > 1e-4:
    raise SystemExit(f"selective_sum_probe: the probe disagrees with XLA ({score_err}, {sum_err})")


if __name__ == "__main__":
  main()
