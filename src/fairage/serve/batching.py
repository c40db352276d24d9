"""Shared forward passes for the face crops of concurrent requests.

``CropBatcher(forward, max_batch, max_wait)`` runs ``forward`` on one thread of its own. Each
``submit(crops)`` queues one request's crops and returns a ``concurrent.futures.Future`` of that
request's ``(ages, spreads)``. The thread takes the oldest queued request, then keeps taking
queued requests, whole, while their crops fit in ``max_batch`` faces, waiting up to
``max_wait`` seconds after the first for more to arrive; then it runs one forward pass over
all of them and hands each request its own rows. A request with more than ``max_batch`` faces
runs alone (``forward`` splits it into its own batches). While a pass runs, new requests queue
up and form the next batch at once, so under load batches fill without waiting; a lone request
waits at most ``max_wait``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

#: ``forward``: uint8 (N, S, S, 3) crops -> (float (N,) years, float (N,) spreads in years or None)
Forward = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]

_STOP = object()


@dataclass
class _Item:
    crops: np.ndarray
    future: Future


class CropBatcher:
    """One forward pass for the crops of several requests (see the module doc).

    ``forward``: uint8 (N, S, S, 3) RGB crops -> ``(ages, spreads)``, float (N,) years and float (N,)
    years or None. ``max_batch``: faces per pass (>= 1). ``max_wait``: seconds the first request
    of a batch waits for others (>= 0). ``passes`` and ``faces`` count the passes run and the
    faces they held (for monitoring).
    """

    def __init__(self, forward: Forward, max_batch: int, max_wait: float, name: str = "fairage-batcher"):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.forward, self.max_batch, self.max_wait = forward, int(max_batch), float(max_wait)
        self.passes = 0
        self.faces = 0
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, crops: np.ndarray) -> Future:
        """Queue one request's uint8 (N, S, S, 3) crops (N >= 1); the Future gives its ``(ages, spreads)``."""
        if len(crops) == 0:
            raise ValueError("submit needs at least one crop")
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None:  # started on first use: an app that never serves holds no thread
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put(_Item(crops, future))
        return future

    def close(self) -> None:
        """Stop the thread once the requests already queued are answered."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(_STOP)
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        carry = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP:
                return
            batch, faces = [item], len(item.crops)
            deadline = time.monotonic() + self.max_wait
            while faces < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()  # whatever queued during the last pass: no wait
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is _STOP or faces + len(nxt.crops) > self.max_batch:
                    carry = nxt  # the next batch starts with it (or the thread stops after this one)
                    break
                batch.append(nxt)
                faces += len(nxt.crops)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # clients gone: skipped
        if not live:
            return
        try:
            ages, spreads = self.forward(np.concatenate([item.crops for item in live]))
        except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
            for item in live:
                item.future.set_exception(err)
            return
        self.passes += 1
        self.faces += len(ages)
        start = 0
        for item in live:
            stop = start + len(item.crops)
            item.future.set_result((ages[start:stop], None if spreads is None else spreads[start:stop]))
            start = stop
