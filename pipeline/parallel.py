"""Work over many images in threads: torch and zlib release the GIL, so threads share one copy of the store.

Every pool here ends only when all its threads have returned. A thread still inside native code when the
interpreter shuts down is stopped by CPython with a forced unwind that C++ cannot pass ("terminate called
without an active exception", exit 134): so on an error or Ctrl-C the other threads stop at their next image
and are joined before the error goes on.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator

import torch


def in_threads(work, samples: list, jobs: int) -> list:
    """Run ``work`` on ``jobs`` interleaved shares of the samples in threads; returns each share's result.
    ``work`` must only iterate over its share (an iteration ends early once another thread has failed)."""
    shares = [samples[i::jobs] for i in range(min(jobs, len(samples)))]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // max(1, len(shares))))  # one level of parallelism, not two
    try:
        return _run([lambda stop, share=share: work(_until(stop, share)) for share in shares])
    finally:
        torch.set_num_threads(threads)


def thread_map(fn: Callable, items: Iterable, jobs: int) -> list:
    """``[fn(item) for item in items]`` on ``jobs`` threads, results in the items' order."""
    items = list(items)
    results: list = [None] * len(items)
    indices = iter(range(len(items)))
    lock = threading.Lock()

    def body(stop: threading.Event) -> None:
        while not stop.is_set():
            with lock:
                i = next(indices, None)
            if i is None:
                return
            results[i] = fn(items[i])

    _run([body] * max(1, min(jobs, len(items))))
    return results


def _until(stop: threading.Event, share: list) -> Iterator:
    for item in share:
        if stop.is_set():
            return
        yield item


def _run(bodies: list[Callable[[threading.Event], object]]) -> list:
    """Each body on its own thread, given the shared stop event; the first error (or the main thread's
    KeyboardInterrupt) is raised once every body has returned."""
    stop = threading.Event()
    results: list = [None] * len(bodies)
    errors: list[BaseException] = []
    finished = [threading.Event() for _ in bodies]

    def run(i: int) -> None:
        try:
            results[i] = bodies[i](stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()
        finally:
            finished[i].set()

    def wait() -> None:
        # Events, not Thread.join: a Ctrl-C inside join marks a running thread stopped (CPython 3.11)
        for event in finished:
            while not event.wait(0.2):  # a timed wait: Ctrl-C reaches the main thread here
                pass

    pool = [threading.Thread(target=run, args=(i,), name=f"conformalsam-{i}") for i in range(len(bodies))]
    try:
        for thread in pool:
            thread.start()
        wait()
    except BaseException:
        stop.set()
        for thread, event in zip(pool, finished):
            if thread.ident is None:  # never started
                event.set()
        while True:
            try:
                wait()
                break
            except BaseException:  # noqa: BLE001 - a second Ctrl-C must not leave a thread behind
                pass
        raise
    finally:
        for thread in pool:
            if thread.ident is not None:
                thread.join()  # each has left its body: a moment
    if errors:
        raise errors[0]
    return results
