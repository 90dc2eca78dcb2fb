"""``Pipeline``: one configuration's members, rankers and fusers, and the line of stages a query
takes through them. Each entry reads top to bottom:

    plan → limit (per key) → admit → route → fan out → rank → vote → (cascade: fan out the rest, rank, vote)
         → fuse (or skip) → respond → record (and keep)

No HTTP here: a ``Query`` comes in, an ``Answer`` goes out (``service.pipeline.types``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass

from service.config import GatewayConfig
from service.errors import GatewayError
from service.limits.limiter import Limiter, Ticket, label_of
from service.members.base import Member
from service.members.breakers import Guards
from service.members.fanout import FanOut
from service.models.fusers.base import Fuser
from service.models.rankers.ranking import Ranker
from service.models.routers.base import Router
from service.pipeline.admission import Admission
from service.pipeline.choose import count_votes, rank
from service.pipeline.fuse import Fusion
from service.pipeline.gather import Ballot, check_quorum, gather, joined
from service.pipeline.plan import Plan, plan
from service.pipeline.record import keep, record
from service.pipeline.respond import respond
from service.pipeline.route import Routing, keys_of, route, uncertain
from service.pipeline.types import Answer, Query
from service.store import Store, config_digest
from service.telemetry.book import StatusBook
from service.telemetry.logs import note_answer
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import stage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lasting:
    """What outlives a reload: metrics, the members' breakers and health, admission, the per-key
    limits, the status book, the store of answers (its settings take effect at a restart)."""

    metrics: Metrics
    guards: Guards
    admission: Admission
    status: StatusBook
    store: Store | None = None
    limiter: Limiter | None = None

    @classmethod
    def new(cls, config: GatewayConfig, metrics: Metrics) -> Lasting:
        res = config.resilience
        store = Store(config.store, config.cache_root(), metrics) if config.store is not None else None
        return cls(
            metrics,
            Guards(metrics, res.breaker, res.health_checks),
            Admission(config.limits, metrics),
            StatusBook(),
            store,
            Limiter(config.limits, metrics),
        )


class Pipeline:
    """Runs queries against one configuration's members, rankers and fusers. ``unavailable``: members
    that could not be prepared (an adapter the server refused), skipped by the fan-out;
    ``server_urls``: the launched servers it was built against (a reload compares them)."""

    def __init__(
        self,
        config: GatewayConfig,
        members: Mapping[str, Member],
        rankers: Mapping[str, Ranker],
        fusers: Mapping[str, Fuser],
        lasting: Lasting,
        unavailable: dict[str, str] | None = None,
        server_urls: dict[str, str] | None = None,
        routers: Mapping[str, Router] | None = None,
    ):
        self.config = config
        self.members = dict(members)
        self.rankers = dict(rankers)
        self.fusers = dict(fusers)
        self.routers = dict(routers or {})
        self.lasting = lasting
        self.unavailable = dict(unavailable or {})
        self.server_urls = dict(server_urls or {})
        self.fan_out = FanOut(
            self.members, lasting.guards, config.resilience.retries, self.metrics, lasting.status, self.unavailable
        )
        self.active = 0
        self._idle: asyncio.Event | None = None
        self.config_digest = config_digest(config.model_dump(mode="json"))

    @property
    def metrics(self) -> Metrics:
        return self.lasting.metrics

    # --- the two entries ---------------------------------------------------------------------

    async def answer(self, query: Query) -> Answer:
        """The whole answer to one query; raises the request's ``GatewayError``."""
        with self.hold() as hold:
            p = plan(self.config, query)
            note_answer(p.id)
            await hold.admit(self.lasting, p)
            fusion = await self._choose(p)
            output = await fusion.text()
            with stage("respond"):
                answer = await respond(p, fusion, output)
            hold.spent = member_tokens(answer)
            self._record(answer, fusion)
        return answer

    async def answer_stream(self, query: Query) -> AnswerStream:
        """Plan, admit, fan out, rank and vote now (their errors are raised here, before any byte
        is sent); the returned stream fuses, and holds the request's slot until it ends."""
        hold = self.hold()
        with hold.on_error():
            p = plan(self.config, query)
            note_answer(p.id)
            await hold.admit(self.lasting, p)
            fusion = await self._choose(p)

        def done(answer: Answer) -> None:
            hold.spent = member_tokens(answer)
            self._record(answer, fusion)

        return AnswerStream(p, fusion, hold, done)

    # --- the stages between plan and respond -------------------------------------------------

    async def _choose(self, p: Plan) -> Fusion:
        """Route, fan out, rank, vote (a cascade's second wave too, when needed): the ballot in its
        final order, and the fusion decided."""
        ens = p.ensemble
        routing = await route(p, self.routers.get(ens.router) if ens.router else None, self.metrics)
        wave = keys_of(p, routing.first) if routing.narrowed else None
        ballot = await gather(self.fan_out, p, wave, final=not routing.reserve)
        ranked = await self._order(p, ballot)
        if routing.reserve and (
            len(ballot.keys) < ens.min_candidates or (ens.cascade is not None and uncertain(p, ballot, routing, ranked))
        ):
            more = await gather(self.fan_out, p, keys_of(p, routing.reserve), final=False)
            routing.reserve_asked = True
            ballot = joined(ballot, more, list(p.requests))
            check_quorum(p, ballot)
            ranked = await self._order(p, ballot)
        self._routed(p, routing, ballot)
        fuser = self.fusers[ens.fuser] if ens.fuser is not None and ranked else None
        return Fusion(p, ballot, fuser, self.metrics)

    async def _order(self, p: Plan, ballot: Ballot) -> bool:
        """Rank (and vote); False when the ranker failed."""
        ranked = True
        if p.ensemble.ranker is not None:
            ranked = await rank(self.rankers[p.ensemble.ranker], p, ballot, self.metrics)
        if p.ensemble.vote:
            count_votes(p, ballot, self.metrics)
        return ranked

    def _routed(self, p: Plan, routing: Routing, ballot: Ballot) -> None:
        """What routing left out goes on the ballot (the answer names it) and into the metrics."""
        ballot.degraded[:0] = routing.degraded
        ballot.not_called = routing.not_called()
        for nc in ballot.not_called:
            self.metrics.calls_saved.labels(p.name, nc.reason).inc(len(keys_of(p, [nc.member])))
        self.metrics.member_calls.labels(p.name).inc(len(ballot.keys) + len(ballot.failed))

    def _record(self, answer: Answer, fusion: Fusion) -> None:
        record(answer, fusion.plan, self.metrics, self.lasting.status, self.config.logging.log_prompts)
        keep(self.lasting.store, answer, fusion, fusion.plan, self.config_digest)

    # --- requests in flight, for reloads -----------------------------------------------------

    def hold(self) -> Hold:
        """A request's claim on this pipeline: a reload retires it only once every hold is closed."""
        self.active += 1
        return Hold(self._leave)

    def _leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs on this pipeline; False if the timeout came first."""
        if self.active == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class Hold:
    """One request's claims: on its pipeline, on its key's limits, and once admitted on an
    admission slot. ``close`` gives them back (the key is charged the members' tokens ``spent``);
    only the first call counts."""

    def __init__(self, on_close: Callable[[], None]):
        self._on_close = on_close
        self._admission: Admission | None = None
        self._limiter: Limiter | None = None
        self._ticket: Ticket | None = None
        self._label: str | None = None
        self.spent = 0  # the members' tokens of the answer, once there is one
        self.closed = False

    async def admit(self, lasting: Lasting, p: Plan) -> None:
        """The key's limits (``RateLimited`` at once when one is reached), then an admission slot;
        waiting in the queue counts against the deadline."""
        with stage("admission", {"gateway.ensemble": p.name}) as span:
            key_id = p.query.origin.key_id if p.query.origin is not None else None
            if lasting.limiter is not None:
                self._limiter = lasting.limiter
                self._label = label_of(key_id)
                span.set_attribute("gateway.key", self._label)
                self._ticket = await lasting.limiter.admit(key_id, p.remaining_s())
            await lasting.admission.acquire(p.remaining_s())
            span.set_attribute("gateway.in_flight", lasting.admission.running)
        self._admission = lasting.admission

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._admission is not None:
            self._admission.release()
        if self._limiter is not None and self._label is not None:
            if self._ticket is None:
                self._limiter.count_tokens(self._label, self.spent)
            else:
                task = asyncio.get_running_loop().create_task(self._limiter.finish(self._ticket, self.spent))
                _finishing.add(task)
                task.add_done_callback(_finishing.discard)
        self._on_close()

    @contextlib.contextmanager
    def on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_finishing: set[asyncio.Task[None]] = set()  # tickets being given back (Redis calls, off the request's path)


def member_tokens(answer: Answer) -> int:
    """What an answer cost its members: every answering member's prompt and completion tokens."""
    return sum(t.prompt_tokens + t.completion_tokens for t in answer.usage.members.values())


class AnswerStream:
    """A query being answered as a stream: fan-out, ranking and voting are done; ``pieces`` fuses.
    After the last piece ``answer`` holds the whole answer. The request's hold is closed when
    ``pieces`` ends, however it ends, or at ``close`` (the client left before it began)."""

    def __init__(self, plan: Plan, fusion: Fusion, hold: Hold, record: Callable[[Answer], None]):
        self._record = record
        self._plan = plan
        self._fusion = fusion
        self._hold = hold
        self.id = plan.id
        self.ensemble = plan.name
        self._answer: Answer | None = None

    @property
    def finish_reason(self) -> str:
        return self._fusion.finish_reason

    @property
    def answer(self) -> Answer:
        """The whole answer, once ``pieces`` has ended without an error."""
        if self._answer is None:
            raise GatewayError("internal error: the answer is not complete", code="internal_error")
        return self._answer

    async def pieces(self) -> AsyncGenerator[str, None]:
        """The answer's text in pieces. Raises only ``GatewayError`` (an unexpected failure is
        logged and becomes an internal error)."""
        try:
            parts: list[str] = []
            async for piece in self._fusion.pieces():
                parts.append(piece)
                yield piece
            with stage("respond"):
                self._answer = await respond(self._plan, self._fusion, "".join(parts))
            self._record(self._answer)
        except (GatewayError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.exception("stream failed")
            raise GatewayError("internal error", code="internal_error") from e
        finally:
            self._hold.close()

    def close(self) -> None:
        """The client is gone before the stream ended (a no-op once it has ended)."""
        self._hold.close()
