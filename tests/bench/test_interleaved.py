"""Round-robin timing: every callable timed each round, in blocks when asked."""

from __future__ import annotations

import collections

from kiln.bench.interleaved import time_interleaved


def test_blocks_run_one_untimed_call_then_the_timed_ones():
    calls: collections.Counter[str] = collections.Counter()
    order: list[str] = []

    def run(key: str):
        def call() -> None:
            calls[key] += 1
            order.append(key)

        return call

    latency = time_interleaved({"a": run("a"), "b": run("b")}, warmup=1, repeats=2, block=3)
    # 1 warm-up call, then per round 1 untimed + 3 timed calls in a row
    assert calls == {"a": 9, "b": 9}
    assert order[2:10] == ["a"] * 4 + ["b"] * 4 and order[10:18] == ["b"] * 4 + ["a"] * 4
    assert set(latency) == {"a", "b"} and all(v.repeats == 2 and v.median_ms >= 0 for v in latency.values())


def test_single_calls_by_default():
    calls: collections.Counter[str] = collections.Counter()
    time_interleaved({"a": lambda: calls.update("a")}, warmup=2, repeats=5)
    assert calls["a"] == 7
