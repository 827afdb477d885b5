"""Shared benchmark helpers: peak RSS of a process tree, timing, data, table printing."""

from __future__ import annotations

import os
import pathlib
import threading
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]


def mnist_dir() -> str:
    """SWIMDIST_DATA_DIR, or the shared test copy beside the repository."""
    d = os.environ.get("SWIMDIST_DATA_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
    if not os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")):
        raise SystemExit(f"MNIST IDX files not found in {d}; set SWIMDIST_DATA_DIR")
    return d


class PeakRSS:
    """Sample the summed RSS of this process and all its descendants (Dask workers too).

    Use as a context manager; ``peak`` is the maximum in bytes, ``base`` the value at entry.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    @staticmethod
    def tree_rss() -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.tree_rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.tree_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.tree_rss())


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a plain aligned table (markdown-compatible)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
