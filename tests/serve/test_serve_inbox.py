"""The server's threads: serve/answers.py `Inbox` (engine-thread events reach each request's queue in order, and a
burst of them wakes the event loop once) and serve/threads.py (torch work on threads that end)."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")

from loraplex.serve.answers import Inbox  # noqa: E402


def test_a_burst_of_events_wakes_the_loop_once_and_keeps_their_order():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakeups
            wakeups += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counted
        inbox = Inbox(loop)
        queues = [asyncio.Queue(), asyncio.Queue()]
        engine = threading.Thread(target=lambda: [inbox.put(queues[i % 2], (i,)) for i in range(40)])
        engine.start()
        engine.join()  # the loop is blocked here: every event arrives before it can drain
        got = [[(await q.get())[0] for _ in range(20)] for q in queues]
        assert got == [list(range(0, 40, 2)), list(range(1, 40, 2))]
        assert wakeups == 1
        inbox.put(queues[0], (40,))  # after a drain, the next event schedules a new one
        assert (await queues[0].get()) == (40,) and wakeups == 2

    asyncio.run(main())


def test_in_fresh_thread_runs_on_a_thread_that_has_ended():
    from loraplex.errors import ConfigError
    from loraplex.serve.threads import in_fresh_thread, to_fresh_thread

    seen: list[threading.Thread] = []

    def work(x: int, *, y: int) -> int:
        seen.append(threading.current_thread())
        return x + y

    assert in_fresh_thread(work, 1, y=2) == 3
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    assert asyncio.run(to_fresh_thread(work, 3, y=4)) == 7 and not seen[1].is_alive()

    def fail() -> None:
        raise ConfigError("bad")

    with pytest.raises(ConfigError, match="bad"):
        in_fresh_thread(fail)
