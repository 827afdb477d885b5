"""A recorded terminal session of `swimdist train`: what its progress shows, and whether the
job's status.json keeps up and its ETAs hold.

Runs the command under a pseudo-terminal (``script -q -c ...``, so stderr is a terminal and
the tqdm bars draw), polls ``<output>/status.json`` during the fit, and prints

- the session as a terminal shows it (bars collapsed to their last state),
- how many distinct states status.json went through (want >= 10),
- for every stage with a known total that ran long enough: at its midpoint, the ETA the
  record gave against the time the stage actually still took (want within 2x).

    python benchmarks/record_progress.py                 # MNIST, M = 4000, 2 GB budget
    python benchmarks/record_progress.py --dataset sine --hidden 1500 -- --n-train 20000

Arguments after ``--`` go to `swimdist train` as they are. The MNIST run takes a few minutes
on 2 cores; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import mnist_dir, print_table  # noqa: E402

#: A stage must run this long for its midpoint ETA to be judged (seconds).
MIN_STAGE = 2.0


def poll(path: str, proc: subprocess.Popen, every: float) -> list[tuple[float, dict]]:
    """Snapshots ``(time, record)`` of the status file each time its content changed."""
    seen: list[tuple[float, dict]] = []
    last = None
    while True:
        running = proc.poll() is None
        try:
            with open(path) as f:
                text = f.read()
            if text != last:
                seen.append((time.monotonic(), json.loads(text)))
                last = text
        except (OSError, ValueError):  # not written yet, or replaced while read
            pass
        if not running:
            return seen
        time.sleep(every)


def midpoint_etas(snapshots: list[tuple[float, dict]]) -> list[list]:
    """Per stage with a total: the ETA at the snapshot nearest the stage's midpoint, the time
    the stage still took from there, and their ratio."""
    final = snapshots[-1][1] if snapshots else {}
    durations = {}
    for s in final.get("stages", []):
        durations.setdefault(s["name"], s["seconds"])  # the first run of a stage's name
    rows = []
    for name, total_s in durations.items():
        if total_s < MIN_STAGE:
            continue
        views = [rec["stage"] for _, rec in snapshots
                 if (rec.get("stage") or {}).get("stage") == name
                 and rec["stage"].get("total") and not rec["stage"].get("finished")
                 and rec["stage"].get("eta") is not None]
        if not views:
            continue
        mid = min(views, key=lambda v: abs(v["elapsed"] - total_s / 2))
        left = total_s - mid["elapsed"]
        ratio = mid["eta"] / left if left > 0 else float("inf")
        rows.append([name, f"{total_s:.1f}", f"{mid['elapsed']:.1f}",
                     f"{mid['done']}/{mid['total']}", f"{mid['eta']:.1f}", f"{left:.1f}",
                     f"{ratio:.2f}", "yes" if 0.5 <= ratio <= 2.0 else "NO"])
    return rows


def terminal_view(typescript: str) -> str:
    """The session as a terminal ends up showing it: each carriage-returned line keeps its
    last state."""
    with open(typescript, encoding="utf-8", errors="replace", newline="") as f:
        raw = f.read()
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # cursor movements of nested bars
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if line.startswith("Script started") or line.startswith("Script done"):
            continue
        parts = [p for p in line.split("\r") if p.strip()]
        if parts:
            lines.append(parts[-1].rstrip())
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "sine"])
    ap.add_argument("--hidden", default="4000")
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between reads")
    ap.add_argument("--want-changes", type=int, default=10)
    ap.add_argument("--workdir", default=None, help="output and typescript (default: temp)")
    ap.add_argument("train_args", nargs="*", help="more `swimdist train` arguments (after --)")
    args = ap.parse_args()
    if shutil.which("script") is None:
        raise SystemExit("needs `script` (util-linux) for the pseudo-terminal")
    work = args.workdir or tempfile.mkdtemp(prefix="swimdist-record-")
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "swimdist.cli", "train", "--dataset", args.dataset,
           "--hidden", args.hidden, "--memory-limit", args.memory_limit, "-o", out]
    if args.dataset == "mnist":
        cmd += ["--data-dir", mnist_dir()]
    cmd += args.train_args
    typescript = os.path.join(work, "session.typescript")
    t0 = time.monotonic()
    proc = subprocess.Popen(["script", "-q", "-c", shlex.join(cmd), typescript],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    snapshots = poll(os.path.join(out, "status.json"), proc, args.poll)
    wall = time.monotonic() - t0
    print(f"$ {shlex.join(cmd[2:])}")
    print(terminal_view(typescript))
    final = snapshots[-1][1] if snapshots else {}
    running = [rec for _, rec in snapshots if rec.get("phase") not in ("done", "failed")]
    print(f"\nexit code {proc.returncode}, {wall:.1f} s; status.json: {len(snapshots)} "
          f"distinct states ({len(running)} while running; want >= {args.want_changes}), "
          f"final phase {final.get('phase')}")
    rows = midpoint_etas(snapshots)
    print_table(f"ETA at each stage's midpoint (stages of >= {MIN_STAGE:g} s with a total)",
                ["stage", "took s", "at s", "done", "ETA s", "actually left s", "ratio",
                 "within 2x"], rows)
    # `script` may exit 0 whatever the command did: the job's own record decides
    ok = (proc.returncode == 0 and final.get("phase") == "done"
          and len(running) >= args.want_changes
          and all(r[-1] == "yes" for r in rows))
    print(f"\n{'PASS' if ok else 'FAIL'} (typescript and output in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
