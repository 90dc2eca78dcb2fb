"""``Pipeline``: one configuration's members, rankers and fusers, and the one path a request takes
through them. No FastAPI here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping

from service.config import EnsembleConfig, GatewayConfig
from service.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelError,
    NoQuorumError,
    NotFoundError,
    RequestError,
)
from service.members.base import Member, MemberRequest
from service.members.breakers import Guards
from service.members.fanout import FanOut, Wait
from service.models.fusion import Fuser
from service.models.ranking import Ranker, fusion_lead
from service.pipeline.admission import Admission
from service.pipeline.inputs import check_limits, input_text, member_messages
from service.pipeline.staged import Staged, respond
from service.pipeline.tracking import Tracker
from service.pipeline.voting import vote
from service.protocol import FailedMember, GenerateRequest, GenerateResponse
from service.telemetry.book import StatusBook
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)

COUNT_TIMEOUT_S = 2.0  # counting a fused answer's tokens (a tokenizer call, or an LLM fuser's /tokenize)


@contextlib.contextmanager
def _ended_on_error(tracker: Tracker) -> Iterator[None]:
    """A request that fails here ends with its error's status (500 for anything unexpected)."""
    try:
        yield
    except GatewayError as e:
        tracker.end(e.status)
        e.counted = True
        raise
    except BaseException:
        tracker.end(500)
        raise


class AnswerStream:
    """A request being answered as a stream: fan-out and ranking are done, ``pieces`` runs the
    fusion. Its tracking ends when ``pieces`` ends, however it ends, or at ``abandon``."""

    def __init__(self, pipeline: Pipeline, staged: Staged, tracker: Tracker):
        self._pipeline = pipeline
        self._staged = staged
        self._tracker = tracker
        self.id = staged.id
        self.ensemble = staged.name
        self.response: GenerateResponse | None = None

    @property
    def finish_reason(self) -> str:
        return self._staged.finish_reason

    async def pieces(self) -> AsyncGenerator[str, None]:
        """The answer's text in pieces; afterwards ``response`` holds the whole response. Raises
        only ``GatewayError`` (an unexpected failure is logged and becomes an internal error)."""
        status = 200
        try:
            parts: list[str] = []
            async for piece in self._pipeline.fuse_stream(self._staged):
                parts.append(piece)
                yield piece
            self.response = await self._pipeline.respond(self._staged, "".join(parts))
        except GatewayError as e:
            status = e.status
            e.counted = True
            raise
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away
            raise
        except Exception as e:
            status = 500
            logger.exception("stream failed")
            raise GatewayError("internal error", code="internal_error") from e
        finally:
            self._tracker.end(status)

    def abandon(self) -> None:
        """The client is gone before the stream ended (a no-op once it has ended)."""
        self._tracker.end(499)


class Pipeline:
    """Runs requests against one configuration's members, rankers and fusers."""

    def __init__(
        self,
        config: GatewayConfig,
        members: Mapping[str, Member],
        rankers: Mapping[str, Ranker],
        fusers: Mapping[str, Fuser],
        metrics: Metrics,
        unavailable: dict[str, str] | None = None,
        server_urls: dict[str, str] | None = None,
        guards: Guards | None = None,
        status: StatusBook | None = None,
        admission: Admission | None = None,
    ):
        self.config = config
        self.members = dict(members)
        self.rankers = dict(rankers)
        self.fusers = dict(fusers)
        self.metrics = metrics
        self.guards = guards or Guards(metrics, config.resilience.breaker, config.resilience.health_checks)
        self.status = status or StatusBook()
        self.admission = admission or Admission(config.limits, metrics)
        self.unavailable = dict(unavailable or {})
        self.server_urls = dict(server_urls or {})
        self.fan_out = FanOut(
            self.members, self.guards, config.resilience.retries, metrics, self.status, self.unavailable
        )
        self.active = 0
        self._idle: asyncio.Event | None = None

    # --- the two entries ---------------------------------------------------------------------

    async def answer(self, request: GenerateRequest) -> GenerateResponse:
        """The whole answer to one request; raises the request's ``GatewayError``."""
        tracker = self._track(request)
        with _ended_on_error(tracker):
            staged = await self._admit_and_stage(request, tracker)
            response = await self.respond(staged, await self._fuse(staged))
        tracker.end(200)
        return response

    async def answer_stream(self, request: GenerateRequest) -> AnswerStream:
        """Fan out and rank now (their errors are raised here, before any byte is sent); the
        returned stream fuses."""
        tracker = self._track(request)
        with _ended_on_error(tracker):
            staged = await self._admit_and_stage(request, tracker)
        return AnswerStream(self, staged, tracker)

    # --- rules -------------------------------------------------------------------------------

    def ensemble(self, name: str | None, param: str = "ensemble") -> tuple[str, EnsembleConfig]:
        """The ensemble a request names (or the default); ``param`` is the field that named it."""
        name = name or self.config.default
        if name not in self.config.ensembles:
            raise NotFoundError(f"the model (ensemble) {name!r} does not exist", param=param, code="model_not_found")
        return name, self.config.ensembles[name]

    @staticmethod
    def deadline_s(ens: EnsembleConfig, request: GenerateRequest) -> float:
        """The request's deadline: the ensemble's, or the request's own when that is sooner."""
        return ens.deadline_s if request.deadline_s is None else min(ens.deadline_s, request.deadline_s)

    # --- in-flight accounting, for reloads ---------------------------------------------------

    def enter(self) -> None:
        """A request starts on this pipeline (it finishes on it, whatever reloads happen)."""
        self.active += 1

    def leave(self) -> None:
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

    # --- the steps ---------------------------------------------------------------------------

    def _track(self, request: GenerateRequest) -> Tracker:
        name = request.ensemble or self.config.default
        label = name if name in self.config.ensembles else "-"
        self.enter()
        return Tracker(self.metrics, label, self.leave)

    async def _admit_and_stage(self, request: GenerateRequest, tracker: Tracker) -> Staged:
        name, ens = self.ensemble(request.ensemble, request.ensemble_param)
        await self.admission.acquire(self.deadline_s(ens, request))
        tracker.admission = self.admission
        return await self._stage(request, name, ens)

    @contextlib.contextmanager
    def _model_errors(self, stage: str, what: str, model: str) -> Iterator[None]:
        """Count a ranker or fuser failure; anything but a ``GatewayError`` becomes ``ModelError``."""
        try:
            yield
        except GatewayError:
            self.metrics.model_errors.labels(stage, model).inc()
            raise
        except Exception as e:
            self.metrics.model_errors.labels(stage, model).inc()
            raise ModelError(f"{what} failed: {type(e).__name__}: {e}") from e

    def _member_requests(
        self, ens: EnsembleConfig, request: GenerateRequest, instruction: str
    ) -> dict[str, MemberRequest]:
        messages = member_messages(request, instruction)
        extensions = request.sampling_extensions.wire() if request.sampling_extensions is not None else None
        out: dict[str, MemberRequest] = {}
        for name in ens.members:
            member = self.config.member(name)
            sampling = member.sampling
            seed = request.seed if request.seed is not None else sampling.seed
            for i in range(member.samples):
                key = name if member.samples == 1 else f"{name}#{i + 1}"
                out[key] = MemberRequest(
                    messages=[dict(m) for m in messages],
                    max_tokens=request.max_tokens or sampling.max_tokens,
                    temperature=request.temperature if request.temperature is not None else sampling.temperature,
                    top_p=request.top_p if request.top_p is not None else sampling.top_p,
                    seed=None if seed is None else seed + i,
                    extensions=extensions,
                )
        return out

    def candidates_of(self, ens: EnsembleConfig) -> int:
        """The candidates an ensemble's request can have: a candidate per member sample."""
        return sum(self.config.member(name).samples for name in ens.members)

    def _degrade(self, staged: Staged, stage: str, model: str, error: BaseException) -> None:
        detail = error.message if isinstance(error, GatewayError) else f"{type(error).__name__}: {error}"
        if isinstance(error, TimeoutError):
            detail = "no result before the deadline"
            self.metrics.model_errors.labels("rank" if stage == "ranker" else "fuse", model).inc()
        logger.warning("%s %s failed; answering without it: %s", stage, model, detail)
        staged.degraded.append(f"{stage}_failed: {detail}")
        self.metrics.degraded.labels(staged.name, f"{stage}_failed").inc()

    async def _stage(self, request: GenerateRequest, name: str, ens: EnsembleConfig) -> Staged:
        """Fan out and rank: everything before fusion. Raises the request's errors.

        A ranker that fails (or overruns the deadline) degrades the answer to the first
        answering member's candidate, in the ensemble's member order; ``Staged.degraded`` says why.
        """
        start = time.perf_counter()
        check_limits(request, self.config.limits)
        deadline_at = time.monotonic() + self.deadline_s(ens, request)
        asked, field = request.candidates_fused
        top_k = asked or ens.top_k
        if asked is not None and asked > (most := self.candidates_of(ens)):
            raise RequestError(f"{field}={asked} exceeds the {most} candidates of ensemble {name!r}", param=field)
        instruction = request.instruction if request.instruction is not None else ens.instruction
        fan_out_until = time.monotonic() + (deadline_at - time.monotonic()) * ens.members_share
        wait = Wait(fan_out_until, ens.effective_quorum, ens.straggler_ratio, ens.straggler_min_s)
        outcomes = await self.fan_out.gather(self._member_requests(ens, request, instruction), wait)
        t_members = time.perf_counter()
        ok = [o for o in outcomes if o.completion is not None]
        failed = [
            FailedMember(member=o.member, error=o.error or "", kind=o.kind) for o in outcomes if o.completion is None
        ]
        if len(ok) < ens.min_candidates:
            detail = "; ".join(f"{f.member}: {f.error}" for f in failed)
            msg = f"{len(ok)} of {len(outcomes)} members answered, {ens.min_candidates} needed ({detail})"
            if any(f.kind in ("timeout", "deadline") for f in failed):
                raise DeadlineExceeded(msg, code="no_quorum")
            raise NoQuorumError(msg, code="no_quorum")

        staged = Staged(
            name=name,
            request=request,
            instruction=instruction,
            input_text=input_text(request),
            members=[o.member for o in ok],
            completions=[o.completion for o in ok if o.completion is not None],
            failed=failed,
            scores=[None] * len(ok),
            ranks=list(range(1, len(ok) + 1)),
            order=list(range(len(ok))),
            selected=[],
            fuser=self.fusers[ens.fuser] if ens.fuser is not None else None,
            start=start,
            t_members=t_members,
            t_rank=t_members,
            deadline_at=deadline_at,
        )
        if ens.ranker is not None:
            await self._rank(staged, self.rankers[ens.ranker])
        if ens.vote:
            counted = vote([c.text for c in staged.completions], staged.scores)
            staged.order, staged.votes = counted.order, counted.counts
            self.metrics.votes.labels(name, counted.outcome).inc()
        if staged.fuser is not None:
            skip = self._skip_fusion(ens, staged)
            if skip is not None:
                self.metrics.fusion_skipped.labels(name, skip).inc()
                staged.fuser = None
        staged.selected = staged.order[: min(top_k, len(ok))] if staged.fuser is not None else staged.order[:1]
        staged.t_rank = time.perf_counter()
        return staged

    async def _rank(self, staged: Staged, ranker: Ranker) -> None:
        t0 = time.perf_counter()
        texts = [c.text for c in staged.completions]
        try:
            async with asyncio.timeout(staged.deadline_at - time.monotonic()):
                with self._model_errors("rank", f"ranker {ranker.name}", ranker.name):
                    ranking = await ranker.rank(staged.instruction + staged.input_text, texts)
        except (GatewayError, TimeoutError) as e:
            self._degrade(staged, "ranker", ranker.name, e)
            staged.fuser = None
            return
        self.metrics.ranker_latency.labels(ranker.name).observe(time.perf_counter() - t0)
        staged.scores = list(ranking.scores)
        staged.ranks = ranking.ranks
        staged.order = ranking.order()

    @staticmethod
    def _skip_fusion(ens: EnsembleConfig, staged: Staged) -> str | None:
        """Why fusion is not worth it for this request (adaptive fusion), or None to fuse."""
        policy = staged.request.fusion or ens.fusion
        if policy == "never":
            return "never"
        if policy == "always" or staged.degraded:
            return None
        if len(staged.order) < 2:
            return "single_candidate"
        lead = fusion_lead([staged.scores[i] for i in staged.order], [staged.completions[i].text for i in staged.order])
        if lead is None:
            return None
        if lead == math.inf:
            return "agreement"
        return "margin" if lead >= ens.fusion_margin else None

    def _fusion_failed(self, staged: Staged, fuser: Fuser, error: BaseException) -> str:
        self._degrade(staged, "fuser", fuser.name, error)
        staged.fuser = None
        staged.selected = staged.order[:1]
        return staged.top_text

    async def _fuse(self, staged: Staged) -> str:
        """The answer: the fuser's output, or the top candidate when the ensemble does not fuse
        or the fuser fails (then ``staged.degraded`` says so)."""
        fuser = staged.fuser
        if fuser is None:
            return staged.top_text
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(staged.deadline_at - time.monotonic()):
                with self._model_errors("fuse", f"fuser {fuser.name}", fuser.name):
                    output = await fuser.fuse(
                        staged.instruction, staged.input_text, staged.selected_texts, staged.request.max_tokens
                    )
        except (GatewayError, TimeoutError) as e:
            return self._fusion_failed(staged, fuser, e)
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)
        return output

    async def fuse_stream(self, staged: Staged) -> AsyncIterator[str]:
        """The answer as it is generated; the pieces join to what ``_fuse`` returns. A fuser that
        fails before its first piece degrades to the top candidate; after it, the error is raised."""
        fuser = staged.fuser
        if fuser is None:
            yield staged.top_text
            return
        t0 = time.perf_counter()
        pieces = fuser.fuse_stream(
            staged.instruction, staged.input_text, staged.selected_texts, staged.request.max_tokens
        )
        started = False
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(anext(pieces), staged.deadline_at - time.monotonic())
                except StopAsyncIteration:
                    break
                except Exception as e:
                    if not isinstance(e, TimeoutError):
                        self.metrics.model_errors.labels("fuse", fuser.name).inc()
                    if started:
                        if isinstance(e, GatewayError):
                            raise
                        raise ModelError(f"fuser {fuser.name} failed: {type(e).__name__}: {e}") from e
                    yield self._fusion_failed(staged, fuser, e)
                    return
                started = True
                yield piece
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)

    async def respond(self, staged: Staged, output: str) -> GenerateResponse:
        """The response, its usage counting ``output``'s tokens as the completion."""
        tokens = await self._answer_tokens(staged, output)
        return respond(staged, output, tokens, self.metrics, self.status, self.config.logging.log_prompts)

    @staticmethod
    async def _answer_tokens(staged: Staged, output: str) -> int:
        """The answer's tokens: the top candidate's own count, or for a fused text the fuser's
        count (whitespace-separated words where the fuser cannot count)."""
        fuser = staged.fuser
        if fuser is None:
            return staged.completions[staged.order[0]].completion_tokens
        try:
            async with asyncio.timeout(COUNT_TIMEOUT_S):
                counted = await fuser.count_tokens(output)
        except Exception as e:
            logger.warning("fuser %s could not count the answer's tokens: %s: %s", fuser.name, type(e).__name__, e)
            counted = None
        return counted if counted is not None else len(output.split())
