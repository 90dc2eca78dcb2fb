import asyncio

from service.members.gate import ClassGate


async def test_same_class_runs_together_other_class_waits() -> None:
    gate = ClassGate()
    log: list[str] = []
    running: dict[str, int] = {"tokens": 0, "embeds": 0}
    overlap: list[int] = []
    release = {name: asyncio.Event() for name in ("t1", "t2", "e1", "t3")}

    async def job(cls: str, name: str) -> None:
        async with gate.hold(cls):
            running[cls] += 1
            overlap.append(running["embeds" if cls == "tokens" else "tokens"])
            log.append(name)
            await release[name].wait()
            running[cls] -= 1

    async def settle() -> None:
        for _ in range(20):  # let every runnable task reach its next wait
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(job("tokens", "t1")), asyncio.create_task(job("tokens", "t2"))]
    await settle()
    tasks.append(asyncio.create_task(job("embeds", "e1")))
    await settle()
    tasks.append(asyncio.create_task(job("tokens", "t3")))  # arrives while e1 waits
    await settle()
    assert log == ["t1", "t2"], "same class runs together; the other class and later arrivals wait"
    release["t1"].set()
    release["t2"].set()
    await settle()
    assert log == ["t1", "t2", "e1"], "a waiting class blocks new arrivals of the running one"
    release["e1"].set()
    await settle()
    release["t3"].set()
    await asyncio.gather(*tasks)
    assert log == ["t1", "t2", "e1", "t3"] and max(overlap) == 0, "classes never overlap"


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
    for _ in range(5):
        await asyncio.sleep(0)  # the waiter is queued
    waiter.cancel()
    release.set()
    await h
    async with asyncio.timeout(1):
        async with gate.hold("tokens"):
            pass
