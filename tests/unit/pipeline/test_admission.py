"""Bounded admission: in-flight cap, queue, shedding and draining."""

import asyncio
import time

import pytest

from service.config import LimitsConfig
from service.errors import Overloaded, ShuttingDown
from service.pipeline.admission import Admission
from service.telemetry.metrics import Metrics
from tests.fakes import sample


async def test_admission_sheds_at_once_when_the_queue_is_full() -> None:
    metrics = Metrics()
    adm = Admission(LimitsConfig(max_in_flight=2, max_queue=1, queue_timeout_s=5), metrics)
    await adm.acquire(10)
    await adm.acquire(10)
    queued = asyncio.create_task(adm.acquire(10))
    await asyncio.sleep(0.01)
    assert sample(metrics, "gateway_queue_depth") == 1
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as e:
        await adm.acquire(10)
    assert time.perf_counter() - t0 < 0.05
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    assert sample(metrics, "gateway_shed_total", reason="queue_full") == 1
    adm.release()  # the queued one gets the slot
    await asyncio.wait_for(queued, 1)
    assert adm.running == 2 and sample(metrics, "gateway_queue_depth") == 0


async def test_admission_queue_timeout_and_cancelled_waiter() -> None:
    adm = Admission(LimitsConfig(max_in_flight=1, max_queue=5, queue_timeout_s=0.05), Metrics())
    await adm.acquire(10)
    with pytest.raises(Overloaded):
        await adm.acquire(10)
    waiter = asyncio.create_task(adm.acquire(10))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    adm.release()
    assert adm.running == 0
    await adm.acquire(10)
    assert adm.running == 1
    adm.draining = True
    with pytest.raises(ShuttingDown):
        await adm.acquire(10)
