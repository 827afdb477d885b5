"""Figures of the benchmark scripts, saved as PNG (matplotlib: the optional ``plot`` extra).

matplotlib is imported lazily, with the non-interactive Agg backend. Without it every function
here returns None and the first call prints one line saying the figures were skipped; the
benchmark tables do not depend on it.

Every function takes plain lists and dicts (what the scripts measured), writes one PNG at
``path`` (dpi 120, tight bounding box, 256-colour palette) and returns its path.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence

SKIP_MESSAGE = "matplotlib not installed (pip install '.[plot]'): figures skipped"
DPI = 120
_skipped = False


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (after printing SKIP_MESSAGE once)."""
    global _skipped
    try:
        import matplotlib
    except ImportError:
        if not _skipped:
            print(SKIP_MESSAGE, flush=True)
            _skipped = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    """``matplotlib.ticker`` (only called once :func:`pyplot` succeeded)."""
    import matplotlib.ticker

    return matplotlib.ticker


def save(fig, path) -> pathlib.Path:
    """Write ``fig`` to ``path`` (parents created), close it, print where it went."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    _palette(path)
    print(f"figure: {path}", flush=True)
    return path


def _palette(path: pathlib.Path) -> None:
    """Re-encode a PNG with a 256-colour palette (Pillow comes with matplotlib).

    Line plots look the same at about a third of the bytes, which keeps the committed
    figures small.
    """
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def _finite(values) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return [v if math.isfinite(v) else math.nan for v in out]


def residual_histories(
    histories: Mapping[str, Sequence[float]],
    references: Mapping[str, float],
    *,
    title: str,
    path,
) -> pathlib.Path | None:
    """Relative residual ``||A X_k - Y||_F / ||Y||_F`` against the iteration ``k``.

    ``histories`` maps a label (e.g. ``"LSRN sparse-sign (29 it., 1.1 s)"``) to the residual
    after each iteration, entry 0 being the starting point; ``references`` maps a label to the
    residual of a direct solver, drawn as a horizontal line. Both axes are logarithmic (the
    x axis is linear between 0 and 1, so the starting point shows).
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # distinct line styles and markers: LSRN variants often lie on top of each other
    looks = [("-", None), ("--", "o"), (":", "s"), ("-.", "^"), ("--", "v")]
    for (label, hist), (ls, marker) in zip(histories.items(), looks * len(histories), strict=False):
        h = _finite(hist)
        ax.plot(range(len(h)), h, ls=ls, marker=marker, ms=3.5, markevery=0.08, lw=1.6, label=label)
    styles = [("k", "--"), ("0.45", ":"), ("tab:brown", "-."), ("tab:pink", "--")]
    for (label, value), (color, ls) in zip(references.items(), styles, strict=False):
        if value is not None and math.isfinite(value) and value > 0:
            ax.axhline(value, color=color, ls=ls, lw=1.2, label=label)
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("iteration (passes over A; 0 = starting point)")
    ax.set_ylabel(r"relative residual $\|AX-Y\|_F\,/\,\|Y\|_F$")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def times_vs_aspect(
    ratios: Sequence[float],
    times: Mapping[str, Sequence[float]],
    *,
    title: str,
    path,
) -> pathlib.Path | None:
    """Solve time in seconds against the aspect ratio ``N / M`` (log-log), one line a solver.

    ``times[label][i]`` is the time at ``ratios[i]`` (NaN or None for a failed run).
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = "os^vD<>px*h"
    for i, (label, ts) in enumerate(times.items()):
        ax.plot(
            list(ratios), _finite(ts), marker=markers[i % len(markers)], ms=5, lw=1.4, label=label
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(ratios))
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("aspect ratio N / M (rows per column of A)")
    ax.set_ylabel("solve time, s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return save(fig, path)


def split_mae(
    panels: Sequence[Mapping],
    *,
    title: str,
    path,
    ylabel: str = "test MAE",
) -> pathlib.Path | None:
    """Error against the number of splits, one line per neuron order, a panel per case.

    Each panel is a mapping with ``"title"``, ``"splits"`` (the k values), ``"values"``
    (order -> error at each k) and ``"full"`` (the full direct solve's error, a dashed line).
    Panels are laid out in rows of at most three; the y axes are logarithmic.
    """
    plt = pyplot()
    if plt is None:
        return None
    n = len(panels)
    cols = min(3, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ks = list(panel["splits"])
        for order, vals in panel["values"].items():
            ax.plot(ks, _finite(vals), "o-", ms=3.5, lw=1.3, label=order)
        full = panel.get("full")
        if full is not None and math.isfinite(full) and full > 0:
            ax.axhline(full, color="k", ls="--", lw=1.2, label="full direct solve")
        ax.set_yscale("log")
        ax.set_xticks(ks)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel("number of splits k")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=len(labels),
        fontsize=8,
        bbox_to_anchor=(0.5, -0.02),
        frameon=False,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, path)


def error_curve(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    path,
    ylabel: str = "test error, %",
    references: Mapping[str, float] | None = None,
    logx: bool = False,
    logy: bool = False,
    annotate: str | None = None,
) -> pathlib.Path | None:
    """Error (e.g. MNIST test error in %) against ``x``, one line per series.

    ``references`` are drawn as horizontal lines; ``annotate`` names the series whose points
    are labelled with their values.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, vals in series.items():
        v = _finite(vals)
        ax.plot(list(x), v, "o-", ms=5, lw=1.5, label=label)
        if label == annotate:
            for xi, yi in zip(x, v, strict=True):
                if math.isfinite(yi):
                    ax.annotate(
                        f"{yi:.2f}",
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=8,
                    )
    for label, value in (references or {}).items():
        if value is not None and math.isfinite(value):
            ax.axhline(value, color="k", ls="--", lw=1.2, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
        ticker = matplotlib_ticker()
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.minorticks_off()
    ax.margins(x=0.06, y=0.12)  # room for the annotations
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{xi:g}" for xi in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
