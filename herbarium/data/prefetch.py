"""Work ahead of the caller: a background thread converts the items of an iterator while the caller uses earlier ones."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_END = object()
_POLL_S = 0.1  # how often a blocked producer checks whether the caller has gone


def prefetched(source: Iterator[Item], convert: Callable[[Item], Result], depth: int) -> Iterator[Result]:
    """``convert(item)`` for every item of ``source``, in order, made by a thread up to ``depth`` results ahead.

    An exception in ``source`` or ``convert`` is raised here, at the item
    where it happened. Leaving the loop early (``break``, an exception,
    the generator closed) stops the thread after the item it is working on,
    and waits for it, so no work of the thread outlives the loop.
    """
    results: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def offer(value: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in source:
                if stop.is_set() or not offer((convert(item), None)):
                    return
            offer((_END, None))
        except BaseException as error:  # handed to the caller, raised there
            offer((None, error))

    thread = threading.Thread(target=work, name="herbarium-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value, error = results.get()
            if error is not None:
                raise error
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        thread.join()
