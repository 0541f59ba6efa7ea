"""Tests for herbarium/data/prefetch.py."""

from __future__ import annotations

import threading
import time

import pytest

from herbarium.data.prefetch import prefetched


def test_results_come_in_order_and_are_made_ahead_on_another_thread():
    made: list[tuple[int, str]] = []

    def convert(item: int) -> int:
        made.append((item, threading.current_thread().name))
        return item * item

    results = prefetched(iter(range(10)), convert, depth=2)
    assert next(results) == 0
    time.sleep(0.2)
    assert len(made) >= 3  # the item in use and two ahead
    assert list(results) == [i * i for i in range(1, 10)]
    assert {name for _, name in made} == {"herbarium-prefetch"}


def test_an_error_is_raised_at_its_item():
    def convert(item: int) -> int:
        if item == 3:
            raise ValueError("bad item 3")
        return item

    results = prefetched(iter(range(10)), convert, depth=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)


def test_leaving_early_stops_the_thread():
    seen: list[int] = []
    for value in prefetched(iter(range(1000)), lambda item: seen.append(item) or item, depth=2):
        if value == 2:
            break
    count = len(seen)
    time.sleep(0.1)
    assert len(seen) == count <= 6
    assert not any(thread.name == "herbarium-prefetch" for thread in threading.enumerate())
