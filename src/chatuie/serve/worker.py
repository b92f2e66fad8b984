"""The model thread of the HTTP server, and the batching of ``/v1/extract`` requests.

One thread owns the model (``generate`` is not re-entrant, and the tokenizer is mutated while
decoding). Concurrent ``/v1/extract`` requests are collected for up to ``batch_window_ms`` (up to
``max_batch_size`` requests) and decoded together in one ``constrained_generate`` call; the
window is only waited while other extraction requests are in flight, so a lone client pays no
extra latency, and requests that arrive while a batch decodes form the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from chatuie.data.schema import ExtractionSchema
from chatuie.serve.extractor import Extractor
from chatuie.serve.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass
class _ExtractJob:
    text: str
    schema: ExtractionSchema
    future: Future = field(default_factory=Future)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


_STOP = object()


class ModelWorker:
    """The one thread that touches the model; batches extraction requests."""

    def __init__(self, extractor: Extractor, settings: ServerSettings) -> None:
        self.extractor = extractor
        self.settings = settings
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {
            "batches": 0,
            "extract_requests": 0,
            "largest_batch": 0,
            "calls": 0,
            "extract_cpu_s": 0.0,
            "extract_busy_s": 0.0,
        }
        # /v1/extract requests between arrival and answer; only the event loop changes it, the
        # model thread reads it (a plain int: atomic under the GIL).
        self.in_flight = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="chatuie-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)

    def submit_extract(self, text: str, schema: ExtractionSchema) -> Future:
        self.start()
        job = _ExtractJob(text, schema)
        self._queue.put(job)
        return job.future

    def submit(self, fn: Callable[[], Any]) -> Future:
        self.start()
        job = _CallJob(fn)
        self._queue.put(job)
        return job.future

    # -- loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        later: list[Any] = []  # jobs that arrived while a batch was being gathered
        while True:
            job = later.pop(0) if later else self._queue.get()
            if job is _STOP:
                return
            if isinstance(job, _CallJob):
                self._run_call(job)
                continue
            batch = [job]
            if self.settings.batching:
                deadline = time.monotonic() + self.settings.batch_window_ms / 1000
                while len(batch) < self.settings.max_batch_size:
                    left = deadline - time.monotonic()
                    # Wait only while more extraction requests are in flight (arrived, body being
                    # read or queued) than collected: a lone client pays no window.
                    waiting = left > 0 and self.in_flight > len(batch)
                    try:
                        nxt = (
                            self._queue.get(timeout=min(left, 0.002)) if waiting else self._queue.get_nowait()
                        )
                    except queue.Empty:
                        if waiting:
                            continue
                        break
                    if isinstance(nxt, _ExtractJob):
                        batch.append(nxt)
                    else:
                        later.append(nxt)
            self._run_batch(batch)

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.stats["calls"] += 1
        try:
            job.future.set_result(job.fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting request, never fatal
            job.future.set_exception(err)

    def _run_batch(self, batch: list[_ExtractJob]) -> None:
        ready = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:  # per request: a schema too large for the context fails that request alone
                self.extractor.window_tokens(job.schema)
            except Exception as err:  # noqa: BLE001
                job.future.set_exception(err)
                continue
            ready.append(job)
        if not ready:
            return
        self.stats["batches"] += 1
        self.stats["extract_requests"] += len(ready)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(ready))
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            results = self.extractor.extract_many(
                [(job.text, job.schema) for job in ready], batch_size=self.settings.max_batch_rows
            )
        except Exception as err:  # noqa: BLE001
            if len(ready) == 1:
                ready[0].future.set_exception(err)
                return
            log.warning("batch of %d failed (%s): retrying one by one", len(ready), err)
            for job in ready:
                try:
                    job.future.set_result(
                        self.extractor.extract_many(
                            [(job.text, job.schema)], batch_size=self.settings.max_batch_rows
                        )[0]
                    )
                except Exception as one_err:  # noqa: BLE001
                    job.future.set_exception(one_err)
            return
        # What the model thread spent (its CPU time covers torch's work with one intra-op thread).
        self.stats["extract_cpu_s"] += time.thread_time() - cpu
        self.stats["extract_busy_s"] += time.perf_counter() - wall
        for job, result in zip(ready, results, strict=True):
            job.future.set_result(result)
