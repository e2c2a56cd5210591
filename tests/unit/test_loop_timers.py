"""The worker loop's timer heap: order, cancellation, and bounded growth."""

from __future__ import annotations

from workers.loop import Loop


def test_timers_run_in_order_and_cancelled_ones_do_not_run():
    loop = Loop()
    ran: list[str] = []
    loop.call_later(0.02, ran.append, "b")
    loop.call_later(0.01, ran.append, "a")
    loop.call_later(0.01, ran.append, "x").cancel()
    loop.call_later(0.03, loop.stop)
    loop.run()
    loop.close()
    assert ran == ["a", "b"]


def test_cancelled_timers_do_not_pile_up():
    """A worker cancels almost every timer it sets (handshake, connect, idle 300 s):
    at thousands of tunnels a second the heap must not grow with the rate."""
    loop = Loop()
    live = [loop.call_later(1000.0, print) for _ in range(100)]
    for _ in range(50_000):
        loop.call_later(300.0, print).cancel()
    assert loop.heap_size() < 3_000
    assert all(not t.cancelled for t in live)
    loop.close()


def test_posted_callbacks_run_on_the_loop():
    import threading

    loop = Loop()
    seen: list[str] = []
    poster = threading.Thread(target=loop.call_soon_threadsafe, args=(seen.append, "posted"))
    poster.start()
    loop.call_later(2.0, loop.stop)
    while not seen:
        loop.run_once()
    poster.join()
    loop.close()
    assert seen == ["posted"]
