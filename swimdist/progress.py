"""Progress of long stages: the one home for bars, log lines, status fields and callbacks.

Every stage that can take more than a few seconds (sampling, feature blocks, sketch and Gram
passes, factorization, LSQR/CG iterations, split blocks, prediction) runs inside
:func:`stage`; it knows nothing about where its progress goes. Each update becomes an
:class:`Event` (stage, done, total, rate, ETA, residual, target) delivered to the sinks of
the innermost :func:`report` block:

- a display: on a terminal one tqdm bar per stage, updated in place; elsewhere (``kubectl
  logs``, a file) a plain line on the ``swimdist.progress`` logger at most every
  ``swimdist.progress-interval`` seconds per stage, and one when the stage ends;
- a job's :class:`~swimdist.service.StatusRecord` (``status.json``), through its
  :meth:`~swimdist.service.StatusRecord.progress` method;
- user callbacks, called with every event.

Without an active :func:`report` (and ``swimdist.progress`` off) a stage costs a clock
read per update and shows nothing: estimators are quiet by default (``verbose=0``).

A stage with a known ``total`` reports ``done / total``, its rate and ETA (remaining work at
the stage's mean rate). Iterations have no known total: they report their residual against
the stopping ``target`` instead.

Dask computes report through :func:`track` (used by :func:`swimdist._dask.compute` and
:func:`swimdist._dask.tree_sum`): the output blocks of a collection (or the partials of a
reduction) counted as their futures complete on a distributed client, or by a dask
callback's ``_posttask`` on the threaded scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass

from . import config

__all__ = ["Event", "Stage", "TaskWork", "active", "counting", "format_event", "format_seconds",
           "report", "stage", "task_ticker", "track"]

logger = logging.getLogger("swimdist.progress")


@dataclass(frozen=True)
class Event:
    """One progress update of a stage.

    ``done``/``total`` count ``unit`` (``total`` None: unknown, e.g. iterations); ``rate`` is
    units per second over the stage so far; ``eta`` the seconds left at that rate (None
    without a total); ``residual``/``target``: the last relative residual of an iteration
    and the value it stops at. ``finished`` marks the stage's last event; ``stopped`` says
    that the stage ended by an error or an interrupt rather than by completing its work.
    """

    stage: str
    done: int
    total: int | None
    unit: str
    elapsed: float
    rate: float | None
    eta: float | None
    residual: float | None = None
    target: float | None = None
    finished: bool = False
    stopped: bool = False

    def as_dict(self) -> dict:
        """The event as plain JSON-ready values (rounded)."""
        d = asdict(self)
        for k in ("elapsed", "rate", "eta"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 3)
        return d


def format_seconds(s: float) -> str:
    """Seconds as "42 s", "3:05 min" or "1:02:03 h"."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}:{s:02d} min"
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d} h"


def format_event(ev: Event) -> str:
    """The plain one-line form of an event (log lines and ``swimdist status``), e.g.
    ``features: 12/30 blocks (40%), 2.1 blocks/s, ETA 9 s`` or
    ``cg: 7 it, residual 3.2e-04 (target 3e-05), 1.5 it/s``."""
    parts = []
    if ev.total is not None:
        pct = 100.0 * ev.done / ev.total if ev.total else 100.0
        parts.append(f"{ev.stage}: {ev.done}/{ev.total} {ev.unit} ({pct:.0f}%)")
    else:
        parts.append(f"{ev.stage}: {ev.done} {ev.unit}")
    if ev.residual is not None:
        tail = f" (target {ev.target:.1e})" if ev.target is not None else ""
        parts.append(f"residual {ev.residual:.2e}{tail}")
    if ev.finished:
        parts.append(f"{'stopped after' if ev.stopped else 'done in'} "
                     f"{format_seconds(ev.elapsed)}")
    else:
        if ev.rate is not None:
            parts.append(f"{ev.rate:.3g} {ev.unit}/s")
        if ev.eta is not None:
            parts.append(f"ETA {format_seconds(ev.eta)}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- sinks
class _Reporter:
    """The sinks of a :func:`report` block: display on or off, a status record, callbacks."""

    def __init__(self, display: bool = False, status=None,
                 callbacks: tuple[Callable[[Event], None], ...] = ()):
        self.display, self.status, self.callbacks = display, status, callbacks
        #: open stages, innermost last (the status record shows the innermost)
        self.open: list[Stage] = []
        self.lock = threading.Lock()

    @property
    def silent(self) -> bool:
        return not (self.display or self.status is not None or self.callbacks)


_QUIET = _Reporter()
_REPORTER: ContextVar[_Reporter] = ContextVar("swimdist_progress", default=_QUIET)


@contextlib.contextmanager
def report(verbose: int = 0, callback: Callable[[Event], None] | None = None, *,
           status=None) -> Iterator[None]:
    """Deliver the events of the stages started inside the block.

    Parameters
    ----------
    verbose : int
        0: no display (unless ``swimdist.progress`` is set, or an enclosing block has one);
        >= 1: a tqdm bar per stage on a terminal, plain log lines elsewhere.
    callback : callable, optional
        Called with every :class:`Event` (in the thread that made the update; keep it
        quick). An exception it raises propagates into the stage, except from the updates
        that running tasks report (:class:`TaskWork`), which come on the distributed
        client's event loop, where distributed logs it.
    status : StatusRecord, optional
        A job's status record: its ``progress`` method receives every event.

    Enclosing blocks keep their sinks: a fit inside a job reports to the job's record.
    """
    outer = _REPORTER.get()
    rep = _Reporter(display=outer.display or verbose >= 1 or bool(config.get("progress")),
                    status=status if status is not None else outer.status,
                    callbacks=outer.callbacks + ((callback,) if callback is not None else ()))
    if outer is not _QUIET:
        rep.open = outer.open  # one stack of open stages per job
        rep.lock = outer.lock
    token = _REPORTER.set(rep)
    # verbose asks to see progress: where logging would drop the lines (nothing configured,
    # or a level above INFO), show them on stderr for the block, as scikit-learn's does
    level, handler = logger.level, None
    if verbose >= 1 and not outer.display and not sys.stderr.isatty():
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)
        if not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
    try:
        yield
    finally:
        _REPORTER.reset(token)
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


class Stage:
    """A running stage; :meth:`update` it as work completes (thread-safe).

    Made by :func:`stage`; ``total`` None means unknown (iterations: pass ``residual`` and
    ``target`` instead).
    """

    def __init__(self, name: str, total: int | None, unit: str, target: float | None,
                 reporter: _Reporter, nested: bool = False, work: float | None = None):
        self.name, self.total, self.unit, self.target = name, total, unit, target
        self.done = 0
        #: with unequal units: the work of all units, and of those done (the ETA's basis)
        self.work, self.work_done = work, 0.0
        self.residual: float | None = None
        self.start = time.monotonic()
        self._rep = reporter
        self._lock = threading.Lock()
        self._last_log = self.start
        self._logged = False
        self._bar = None
        self._closed = False
        if reporter.display and sys.stderr.isatty():
            import shutil

            from tqdm import tqdm

            # a pseudo-terminal without a size (``script`` off a terminal) reads as 0 x 0,
            # which tqdm takes for a screen too small to draw on
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=total, desc=name, unit=f" {unit}" if unit else "it",
                             leave=not nested, ncols=size.columns, nrows=size.lines,
                             file=sys.stderr, mininterval=0.5)

    def event(self, finished: bool = False) -> Event:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        eta = None
        if self.work and self.work_done > 0:
            eta = max(0.0, elapsed * (self.work - self.work_done) / self.work_done)
        elif self.total is not None and rate:
            eta = max(0.0, (self.total - self.done) / rate)
        return Event(self.name, self.done, self.total, self.unit, elapsed, rate,
                     0.0 if finished and self.total is not None else eta, self.residual,
                     self.target, finished)

    def update(self, n: int = 1, *, residual: float | None = None, done: int | None = None,
               total: int | None = None, work: float | None = None) -> None:
        """``n`` more units done (or ``done`` in all), of ``work`` (stages with a ``work``
        total); the latest ``residual``; a ``total`` that became known."""
        if work is not None:
            self.work_done += work
        if self._rep.silent:
            self.done = self.done + n if done is None else done
            return
        if self._closed:  # a late update (a callback thread) after the stage ended
            return
        with self._lock:
            step = n if done is None else done - self.done
            self.done += step
            if total is not None and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
                    self._bar.refresh()
            if residual is not None and math.isfinite(residual):
                self.residual = float(residual)
            ev = self.event()
            if self._bar is not None:
                if self.residual is not None:
                    post = f"residual {self.residual:.2e}"
                    if self.target is not None:
                        post += f" (target {self.target:.0e})"
                    self._bar.set_postfix_str(post, refresh=False)
                self._bar.update(step)
        self._emit(ev)

    def close(self, stopped: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if not self._rep.silent:
            self._emit(dataclasses.replace(self.event(finished=True), stopped=stopped))

    def _emit(self, ev: Event) -> None:
        rep = self._rep
        if rep.display and self._bar is None:
            now = time.monotonic()
            interval = float(config.get("progress-interval", 5.0))
            # a stage's last line unless it was short and said nothing before
            last = ev.finished and (self._logged or ev.elapsed >= min(1.0, interval))
            if last or (not ev.finished and now - self._last_log >= interval):
                self._last_log, self._logged = now, True
                logger.info("%s", format_event(ev))
        if rep.status is not None:
            # the record follows the innermost open stage; every stage's end is recorded
            with rep.lock:
                innermost = not rep.open or rep.open[-1] is self
            if ev.finished or innermost:
                rep.status.progress(ev)
        for cb in rep.callbacks:
            cb(ev)


@contextlib.contextmanager
def stage(name: str, total: int | None = None, *, unit: str = "",
          target: float | None = None, work: float | None = None) -> Iterator[Stage]:
    """Run a stage named ``name`` of ``total`` units (None: unknown) inside the block.

    ``unit`` names what is counted ("blocks", "panels", "it"); ``target``: the residual an
    iteration stops at; ``work``: the total work when units differ in size (Gram panels),
    each :meth:`Stage.update` then saying how much it did: the ETA is then the time for
    the work left at the work rate so far. The stage's last event (``finished``) comes when
    the block exits, also on an error.
    """
    rep = _REPORTER.get()
    if rep is _QUIET and config.get("progress"):
        rep = _Reporter(display=True)
    st = Stage(name, total, unit, target, rep, nested=bool(rep.open), work=work)
    if not rep.silent:
        with rep.lock:
            rep.open.append(st)
        st._emit(st.event())  # the stage has begun (shown in the status record at once)
    stopped = True
    try:
        yield st
        stopped = False
    finally:
        if not rep.silent:
            with rep.lock:
                if st in rep.open:
                    rep.open.remove(st)
        st.close(stopped=stopped)


def active() -> bool:
    """Whether a stage started now would be reported anywhere."""
    return not _REPORTER.get().silent or bool(config.get("progress"))


# --------------------------------------------------------------------------- dask computes
def counting(keys, st: Stage):
    """A dask callback (threaded scheduler; use it as a context manager) that counts the
    tasks ``keys`` into ``st`` as they finish."""
    from dask.callbacks import Callback

    keys = set(keys)

    class _Count(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in keys:
                st.update(1)

    return _Count()


def track(x, st: Stage, *, persist: bool = False, count=None):
    """Compute (or with ``persist``, persist and wait for) the dask collection ``x``,
    counting its output blocks into ``st`` as they complete: their futures on a distributed
    client (``distributed.as_completed``), a dask callback's ``_posttask`` on the threaded
    scheduler. ``count``: other keys to count there instead (the leaves of a reduction,
    :func:`swimdist._dask.tree_sum`; the graph is then left unoptimized, since blockwise
    fusion renames the leaves). Returns the result (the persisted collection)."""
    from dask.core import flatten

    from ._dask import current_client

    keys = set(flatten(x.__dask_keys__())) if count is None else set(count)
    client = current_client()
    if client is None:
        kw = {} if count is None else {"optimize_graph": False}
        with counting(keys, st):
            return x.persist(**kw) if persist else x.compute(**kw)
    from distributed import as_completed, futures_of

    y = x.persist()
    futures = futures_of(y)
    for _ in as_completed(futures):
        st.update(1)
    for fut in futures:
        if fut.status != "finished":
            fut.result()  # the block's own error (a lost scheduler says so here)
    return y if persist else y.compute()


# --------------------------------------------------------------------------- work inside tasks
#: Seconds between a running task's reports of the work it has done.
TICK_INTERVAL = 0.5


class TaskWork:
    """Work done inside a stage's long tasks, reported by the workers while they run.

    A stage of a few long tasks running side by side (the Gram panels: as many as there are
    workers, each a pass over every row) learns its rate only when one ends, and the first to
    end is the smallest: its rate and ETA would say nothing for most of the stage. Each task
    instead reports the work of every row block it finishes (:func:`task_ticker`), through
    distributed's worker events (``Worker.log_event`` on the worker, ``Client.subscribe_topic``
    here), so the stage's work done, and with it the ETA, follows the whole cluster.

    ``topic`` goes to the tasks (None when the stage is reported nowhere: the tasks then send
    nothing); :meth:`finish` counts a task that ended, with whatever work its reports missed.
    """

    def __init__(self, st: Stage, client):
        import uuid

        self.st, self._client = st, client
        self._lock = threading.Lock()
        self._reported: dict[str, float] = {}
        self._finished: set[str] = set()
        self.topic: str | None = None
        if client is not None and not st._rep.silent:
            self.topic = f"swimdist-progress-{uuid.uuid4().hex}"
            client.subscribe_topic(self.topic, self._on_event)

    def _on_event(self, event) -> None:
        _, (key, work) = event
        with self._lock:
            if key in self._finished:
                return
            self._reported[key] = self._reported.get(key, 0.0) + float(work)
        self.st.update(0, work=float(work))

    def finish(self, key: str, work: float) -> None:
        """Task ``key`` (of ``work`` in all) ended: one unit done, its unreported work added."""
        with self._lock:
            self._finished.add(key)
            rest = float(work) - self._reported.pop(key, 0.0)
        self.st.update(1, work=max(rest, 0.0))

    def close(self) -> None:
        if self.topic is not None:
            with contextlib.suppress(Exception):  # a client already closed
                self._client.unsubscribe_topic(self.topic)
            self.topic = None

    def __enter__(self) -> TaskWork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def task_ticker(topic: str | None, key: str, interval: float = TICK_INTERVAL
                ) -> Callable[[float], None]:
    """In a task: ``tick(work)`` adds ``work`` done to task ``key``'s report on ``topic``
    (:class:`TaskWork`), sent at most every ``interval`` seconds; a no-op without a topic
    or outside a distributed worker."""
    worker = None
    if topic is not None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            worker = get_worker()
    if worker is None:
        return lambda work: None
    pending = [0.0, time.monotonic()]

    def tick(work: float) -> None:
        pending[0] += work
        now = time.monotonic()
        if now - pending[1] >= interval:
            worker.log_event(topic, [key, pending[0]])
            pending[0], pending[1] = 0.0, now

    return tick
