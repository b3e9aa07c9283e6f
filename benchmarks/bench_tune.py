"""tune-weights wall time vs members M and OOF rows N (C = 18), and the re-vote of cached test logits.

    python benchmarks/bench_tune.py [--quick]

For each (M, N): member probabilities once, Caruana (50 rounds, macro-F1), scipy simplex
weights (log-loss), class biases (3 sweeps, macro-F1) — "total" is the sum of those four, the
in-sample tuning the target speaks of — plus temperature fitting on its own. For M=20,
N=20k the whole ``tune_weights`` (temperatures, Caruana, biases, baselines and the honest
5-fold nested score) is timed too. The re-vote applies a 20-member recipe to 12,600 cached
test rows (the mask eval set). Synthetic logits: informative members of varied quality.
Targets: M=20, N=20k total < 3 s; re-vote < 0.5 s; time linear in N (n_linearity ~ 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ensembler.ensemble import (  # noqa: E402
    Recipe,
    RecipeMember,
    caruana_select,
    fit_class_biases,
    fit_temperature,
    member_probabilities,
    scipy_weights,
    tune_weights,
)

C = 18


def synthetic(m: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = np.r_[np.full(C - 4, 1.0), [0.3, 0.2, 0.1, 0.05]]
    y = rng.choice(C, n, p=p / p.sum())
    quality = rng.uniform(0.5, 2.5, m).astype(np.float32)
    logits = rng.standard_normal((m, n, C), dtype=np.float32) * 1.5
    logits[:, np.arange(n), y] += quality[:, None]
    folds = rng.integers(0, 5, n)
    return logits, y, folds


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def bench_one(m: int, n: int) -> dict:
    logits, y, _ = synthetic(m, n)
    probs, t_probs = timed(member_probabilities, logits)
    _, t_car = timed(caruana_select, probs, y, "f1", 50)
    w, t_sci = timed(scipy_weights, probs, y)
    blend = np.tensordot(w, probs, axes=1).astype(np.float64)
    _, t_bias = timed(fit_class_biases, np.log(np.maximum(blend, 1e-300)), y, "f1")
    t0 = time.perf_counter()
    for i in range(m):
        fit_temperature(logits[i], y)
    t_temp = time.perf_counter() - t0
    return {"m": m, "n": n, "probs": t_probs, "caruana": t_car, "scipy": t_sci, "bias": t_bias,
            "total": t_probs + t_car + t_sci + t_bias, "temperature": t_temp}


def bench_full_tune(m=20, n=20_000) -> float:
    logits, y, folds = synthetic(m, n, seed=1)
    _, t = timed(tune_weights, list(logits), y, folds, method="caruana", metric="f1", rounds=50,
                 temperature=True, class_bias=True, honest=True)
    return t


def bench_revote(m=20, n=12_600, repeats=5) -> float:
    rng = np.random.default_rng(2)
    classes = tuple(str(i) for i in range(C))
    w = rng.dirichlet(np.ones(m))
    recipe = Recipe(members=tuple(RecipeMember(f"m{i}", "family", classes, weight=float(w[i]),
                                               temperature=float(rng.uniform(0.5, 2))) for i in range(m)),
                    class_biases=tuple(rng.normal(0, 0.3, C)))
    logits = {f"m{i}": rng.standard_normal((n, C), dtype=np.float32) for i in range(m)}
    best = np.inf
    for _ in range(repeats):
        _, t = timed(recipe.apply, logits)
        best = min(best, t)
    return best


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="M in {5, 20}, N in {5k, 20k} only")
    args = ap.parse_args(argv)
    ms = (5, 20) if args.quick else (5, 20, 50)
    ns = (5_000, 20_000) if args.quick else (5_000, 20_000, 100_000)

    import scipy.optimize  # noqa: F401  - imported before timing, not inside the first scipy row

    console = Console()
    console.print(f"bench_tune: C={C}, {os.cpu_count()} CPU(s), numpy {np.__version__}")
    table = Table(title="tune-weights wall time (s): Caruana 50 rounds + scipy + class bias", title_justify="left")
    for col in ("M", "N", "probs", "caruana", "scipy", "bias", "total", "temperatures"):
        table.add_column(col, justify="right")
    results = {}
    for m in ms:
        for n in ns:
            r = bench_one(m, n)
            results[(m, n)] = r
            table.add_row(str(m), f"{n:,}", *(f"{r[k]:.3f}" for k in ("probs", "caruana", "scipy", "bias", "total",
                                                                       "temperature")))
    console.print(table)
    full = bench_full_tune()
    revote = bench_revote()
    console.print(f"tune_weights M=20 N=20k with temperatures, bias, baselines and honest 5-fold: {full:.2f} s")
    console.print(f"re-vote of 12,600 cached test rows (20-member recipe, temperatures + biases): {revote:.4f} s")
    n_hi = ns[-1]
    lin = (results[(20, n_hi)]["total"] / results[(20, 20_000 if n_hi != 20_000 else 5_000)]["total"]) / (
        n_hi / (20_000 if n_hi != 20_000 else 5_000))
    m20 = results[(20, 20_000)]
    print(f"RATIOS m20_n20k_total_s={m20['total']:.3f} m20_n20k_caruana_s={m20['caruana']:.3f} "
          f"m20_n20k_scipy_s={m20['scipy']:.3f} m20_n20k_bias_s={m20['bias']:.3f} "
          f"m20_n20k_temperature_s={m20['temperature']:.3f} m20_n20k_full_honest_s={full:.2f} "
          f"revote_s={revote:.4f} n_linearity={lin:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
