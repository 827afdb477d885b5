"""The whole model-selection path in one pass against one plain fit, side by side.

MNIST 60k/10k, tanh, seed 0. ``SWIMClassifierCV(hidden_layer_sizes=(M,), widths=[1000, 2000,
..., M], alphas=[0, 1e-6, 1e-4, 1e-2], validation_fraction=0.1)`` (sample at M, one Gram pass
over the distinct neurons' features with the validation rows' Gram kept apart, every
(width, alpha) solved on the training rows and scored on the validation rows in one more pass,
the best refit on all rows from the same Gram matrix) against ``SWIMClassifier(
hidden_layer_sizes=(M,), random_state=0)`` (the default solver ``auto``), in the same process,
one after the other.

Tables:

1. times: plain fit at M, the path, and path / fit (target <= 1.5), with the path's stages;
2. validation error (%) of every (width, alpha) and the chosen point;
3. test error (%) of the path's models (fitted on all training rows) against separately
   fitted ``SWIMClassifier(hidden_layer_sizes=(m,), alpha=a, solver="normal")`` at a few
   widths, and the difference in points (target: within 0.02).

    flock /tmp/swimdist-bench.lock python benchmarks/bench_selection.py --max-width 4000

``--max-width 20000`` is the full run (about 20 minutes on 2 cores: the Gram pass dominates,
then one eigendecomposition per width for alpha = 0; see the README's "Model selection").
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import PeakRSS, gb, mnist_dir, print_table  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-width", type=int, default=20000, help="M, the widest layer")
    ap.add_argument("--step", type=int, default=1000, help="width grid: step, step*2, ..., M")
    ap.add_argument("--widths", default=None,
                    help="explicit width grid (comma list or start:stop:step); overrides --step")
    ap.add_argument("--alphas", default="0,1e-6,1e-4,1e-2")
    ap.add_argument("--check-widths", default=None,
                    help="widths fitted separately for table 3 (default: first, middle, last)")
    ap.add_argument("--n-train", type=int, default=None, help="first rows of MNIST's 60 000")
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    args = ap.parse_args(argv)

    from swimdist import SWIMClassifier, SWIMClassifierCV
    from swimdist.datasets import load_mnist
    from swimdist.selection import parse_grid

    M = args.max_width
    widths = (parse_grid(args.widths, integer=True) if args.widths
              else list(range(args.step, M + 1, args.step)))
    if widths[-1] != M:
        widths.append(M)
    alphas = parse_grid(args.alphas)
    check = (parse_grid(args.check_widths, integer=True) if args.check_widths
             else sorted({widths[0], widths[len(widths) // 2], widths[-1]}))
    X, y, Xt, yt = load_mnist(mnist_dir())
    if args.n_train:
        X, y = X[: args.n_train], y[: args.n_train]
    print(f"MNIST {X.shape[0]} train / {Xt.shape[0]} test, M = {M}, {len(widths)} widths x "
          f"{len(alphas)} alphas", flush=True)

    with PeakRSS() as rss_fit:
        fit = SWIMClassifier(hidden_layer_sizes=(M,), random_state=0).fit(X, y)
    t_fit = rss_fit.seconds
    err_fit = 100 * np.mean(fit.predict(Xt) != yt)
    del fit
    with PeakRSS() as rss_path:
        cv = SWIMClassifierCV(hidden_layer_sizes=(M,), widths=widths, alphas=alphas,
                              validation_fraction=args.validation_fraction,
                              random_state=0).fit(X, y)
    t_path = rss_path.seconds
    st = cv.timings_
    print_table("1. time: plain fit at M against the whole path",
                ["run", "seconds", "ratio", "peak RSS", "stages"],
                [[f"SWIMClassifier({M}) auto", f"{t_fit:.1f}", "1.00",
                  gb(rss_fit.peak), f"test error {err_fit:.2f} %"],
                 [f"path {len(widths)}x{len(alphas)}", f"{t_path:.1f}",
                  f"{t_path / t_fit:.2f}", gb(rss_path.peak),
                  ", ".join(f"{k} {v:.1f}" for k, v in st.items() if k != "total")]])

    res = cv.cv_results_
    rows = []
    for m in widths:
        on = res["width"] == m
        rows.append([m, *[f"{100 * e:.2f}" for e in res["validation_error"][on]]])
    print_table(f"2. validation error (%) of {len(widths)} widths x {len(alphas)} alphas; "
                f"chosen: width {cv.best_width_}, alpha {cv.best_alpha_:g}",
                ["width", *[f"alpha={a:g}" for a in alphas]], rows)

    rows = []
    worst = 0.0
    for m in widths:
        for a in alphas:
            e_path = 100 * np.mean(cv.model_at(width=m, alpha=a).predict(Xt) != yt)
            if m in check:
                t0 = time.perf_counter()
                sep = SWIMClassifier(hidden_layer_sizes=(m,), alpha=a, solver="normal",
                                     random_state=0).fit(X, y)
                t_sep = time.perf_counter() - t0
                e_sep = 100 * np.mean(sep.predict(Xt) != yt)
                d = cv.decision_function_at(Xt, width=m, alpha=a) - sep.decision_function(Xt)
                worst = max(worst, abs(e_path - e_sep))
                rows.append([m, f"{a:g}", f"{e_path:.2f}", f"{e_sep:.2f}",
                             f"{e_path - e_sep:+.2f}", f"{np.abs(d).max():.1e}", f"{t_sep:.1f}"])
            else:
                rows.append([m, f"{a:g}", f"{e_path:.2f}", "", "", "", ""])
    print_table("3. test error (%): path models against separate fits",
                ["width", "alpha", "path", "separate", "points", "max |decision diff|",
                 "separate fit s"], rows)
    print(f"path / fit = {t_path / t_fit:.2f} (target <= 1.5); worst test-error difference "
          f"{worst:.2f} points (target <= 0.02)", flush=True)


if __name__ == "__main__":
    main()
