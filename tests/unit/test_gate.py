import asyncio

from service.members.gate import ClassGate


async def test_same_class_runs_together_other_class_waits() -> None:
    gate = ClassGate()
    log: list[tuple[str, str]] = []
    running: dict[str, int] = {"tokens": 0, "embeds": 0}
    overlap = []

    async def job(cls: str, name: str, hold: float) -> None:
        async with gate.hold(cls):
            running[cls] += 1
            other = "embeds" if cls == "tokens" else "tokens"
            overlap.append(running[other])
            log.append(("start", name))
            await asyncio.sleep(hold)
            log.append(("end", name))
            running[cls] -= 1

    await asyncio.gather(
        job("tokens", "t1", 0.05),
        job("tokens", "t2", 0.05),
        job("embeds", "e1", 0.01),
        job("tokens", "t3", 0.01),
    )
    assert max(overlap) == 0, "classes never overlap"
    starts = [n for e, n in log if e == "start"]
    assert starts[:2] == ["t1", "t2"], "same class runs together"
    assert starts.index("e1") < starts.index("t3"), "a waiting class blocks new arrivals of the running one"


async def test_cancelled_waiter_does_not_wedge_the_gate() -> None:
    gate = ClassGate()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.hold("tokens"):
            entered.set()
            await release.wait()

    h = asyncio.create_task(holder())
    await entered.wait()
    waiter = asyncio.create_task(gate.hold("embeds").__aenter__())
    await asyncio.sleep(0.01)
    waiter.cancel()
    release.set()
    await h
    async with asyncio.timeout(1):
        async with gate.hold("tokens"):
            pass
