"""The ensemble pipeline: fan out to members, rank the candidates, fuse the best. No FastAPI here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from service.config import EnsembleConfig, GatewayConfig
from service.errors import (
    DeadlineExceeded,
    GatewayError,
    ModelError,
    NoQuorumError,
    NotFoundError,
    RequestError,
)
from service.fusion import Fuser
from service.members import Completion, Member, MemberFailure, MemberRequest
from service.metrics import Metrics
from service.protocol import (
    Candidate,
    FailedMember,
    GenerateRequest,
    GenerateResponse,
    Timings,
    Usage,
)
from service.ranking import Ranker
from service.resilience import Guards, backoff_s, retryable
from service.status import StatusBook

logger = logging.getLogger(__name__)


def input_text(request: GenerateRequest) -> str:
    """The ``input`` that ranker and fuser see (see ``GenerateRequest``)."""
    if request.prompt is not None:
        return request.prompt
    messages = request.messages or []
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def member_messages(request: GenerateRequest, instruction: str) -> list[dict[str, str]]:
    """The conversation members receive: the instruction, if any, leads the first user turn."""
    if request.prompt is not None:
        messages = [{"role": "user", "content": request.prompt}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in request.messages or []]
    if instruction:
        for m in messages:
            if m["role"] == "user":
                m["content"] = f"{instruction}\n\n{m['content']}"
                break
    return messages


@dataclass
class Staged:
    """A request after fan-out and ranking, before fusion."""

    name: str
    request: GenerateRequest
    instruction: str
    input_text: str
    members: list[str]  # of the candidates that arrived, in arrival-list order
    completions: list[Completion]
    failed: list[FailedMember]
    scores: list[float | None]
    ranks: list[int]
    order: list[int]  # candidate indices, best first
    selected: list[int]  # fed to the fuser (or the one returned), in rank order
    fuser: Fuser | None
    start: float
    t_members: float
    t_rank: float
    deadline_at: float  # time.monotonic() by which the request must be answered
    degraded: list[str] = field(default_factory=list)  # why the answer is less than a full one
    id: str = field(default_factory=lambda: f"gen-{uuid.uuid4().hex}")

    @property
    def selected_texts(self) -> list[str]:
        return [self.completions[i].text for i in self.selected]


@dataclass
class _Outcome:
    member: str
    completion: Completion | None = None
    error: str | None = None
    kind: str | None = None  # the failure's kind, for a failed call


class Pipeline:
    """Runs requests against one configuration's members, rankers and fusers."""

    def __init__(
        self,
        config: GatewayConfig,
        members: dict[str, Member],
        rankers: dict[str, Ranker],
        fusers: dict[str, Fuser],
        metrics: Metrics,
        unavailable: dict[str, str] | None = None,
        server_urls: dict[str, str] | None = None,
        guards: Guards | None = None,
        status: StatusBook | None = None,
    ):
        self.config = config
        self.guards = guards or Guards(metrics, config.resilience.breaker, config.resilience.health_checks)
        self.status = status or StatusBook()
        self.unavailable = dict(unavailable or {})
        self.server_urls = dict(server_urls or {})
        self.active = 0
        self._idle: asyncio.Event | None = None
        self.members = members
        self.rankers = rankers
        self.fusers = fusers
        self.metrics = metrics

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

    def ensemble(self, name: str | None) -> tuple[str, EnsembleConfig]:
        name = name or self.config.default
        if name not in self.config.ensembles:
            raise NotFoundError(f"unknown ensemble {name!r}", param="ensemble", code="ensemble_not_found")
        return name, self.config.ensembles[name]

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

    def check_limits(self, request: GenerateRequest) -> None:
        limits = self.config.limits
        chars = len(request.prompt or "") + len(request.instruction or "")
        chars += sum(len(m.content) for m in request.messages or [])
        if chars > limits.max_prompt_chars:
            param = "messages" if request.messages else "prompt"
            raise RequestError(
                f"the prompt has {chars} characters; the limit is {limits.max_prompt_chars}",
                param=param,
                code="prompt_too_long",
            )
        if request.messages and len(request.messages) > limits.max_messages:
            raise RequestError(
                f"{len(request.messages)} messages; the limit is {limits.max_messages}",
                param="messages",
                code="too_many_messages",
            )
        if request.max_tokens is not None and request.max_tokens > limits.max_tokens:
            raise RequestError(
                f"max_tokens={request.max_tokens} exceeds the limit {limits.max_tokens}",
                param="max_tokens",
                code="max_tokens_too_large",
            )

    async def _call(self, member: Member, request: MemberRequest, deadline_at: float) -> _Outcome:
        """One member's answer, retried after connection errors and 5xx while the deadline allows."""
        breaker = self.guards.breaker(member.name)
        retry = self.config.resilience.retries
        attempt = 1
        try:
            while True:
                try:
                    completion = await member.generate(request)
                except MemberFailure as e:
                    pause = backoff_s(attempt, retry)
                    if retryable(e) and attempt < retry.attempts and time.monotonic() + pause < deadline_at:
                        self.metrics.retries.labels(member.name).inc()
                        attempt += 1
                        await asyncio.sleep(pause)
                        continue
                    self.metrics.member_errors.labels(member.name, e.kind).inc()
                    self.status.call(member.name, None, str(e))
                    breaker.failure(str(e))
                    return _Outcome(member.name, error=str(e), kind=e.kind)
                breaker.success()
                self.status.call(member.name, completion.latency_ms)
                self.metrics.member_latency.labels(member.name).observe(completion.latency_ms / 1000)
                return _Outcome(member.name, completion=completion)
        except asyncio.CancelledError:
            breaker.release_probe()
            raise

    def _skip_reason(self, name: str) -> _Outcome | None:
        if name in self.unavailable:
            self.metrics.member_errors.labels(name, "unavailable").inc()
            return _Outcome(name, error=f"unavailable: {self.unavailable[name]}", kind="unavailable")
        breaker = self.guards.breaker(name)
        if not breaker.allow():
            self.metrics.member_errors.labels(name, "circuit_open").inc()
            return _Outcome(
                name,
                error=f"circuit_open: skipped for {breaker.retry_in_s:.1f}s more after {breaker.reason}",
                kind="circuit_open",
            )
        return None

    async def fan_out(
        self, ens: EnsembleConfig, request: GenerateRequest, instruction: str, deadline_at: float
    ) -> list[_Outcome]:
        """Ask every member; stop waiting at the deadline, or once the quorum has answered and
        the stragglers have had ``straggler_ratio`` times as long again."""
        messages = member_messages(request, instruction)
        tasks: dict[asyncio.Task[_Outcome], str] = {}
        outcomes: list[_Outcome] = []
        for name in ens.members:
            skip = self._skip_reason(name)
            if skip is not None:
                outcomes.append(skip)
                continue
            sampling = self.config.member(name).sampling
            member_request = MemberRequest(
                messages=[dict(m) for m in messages],
                max_tokens=request.max_tokens or sampling.max_tokens,
                temperature=request.temperature if request.temperature is not None else sampling.temperature,
                top_p=request.top_p if request.top_p is not None else sampling.top_p,
                seed=request.seed if request.seed is not None else sampling.seed,
            )
            tasks[asyncio.create_task(self._call(self.members[name], member_request, deadline_at))] = name
        start = time.monotonic()
        cutoff = deadline_at
        answered = 0
        pending: set[asyncio.Task[_Outcome]] = set(tasks)
        while pending:
            wait = cutoff - time.monotonic()
            if wait <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            answered += sum(1 for t in done if t.result().completion is not None)
            if cutoff == deadline_at and answered >= ens.effective_quorum:
                now = time.monotonic()
                cutoff = min(deadline_at, now + max(ens.straggler_min_s, (now - start) * ens.straggler_ratio))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        straggler = cutoff < deadline_at
        for task, name in tasks.items():
            if task in pending:
                self.status.call(name, None, "straggler" if straggler else "deadline")
            if task not in pending:
                outcomes.append(task.result())
            elif straggler:
                self.metrics.member_errors.labels(name, "straggler").inc()
                waited = time.monotonic() - start
                outcomes.append(
                    _Outcome(name, error=f"straggler: the quorum had answered; waited {waited:.2f}s", kind="straggler")
                )
            else:
                self.metrics.member_errors.labels(name, "deadline").inc()
                self.guards.breaker(name).failure("no answer before the deadline")
                outcomes.append(_Outcome(name, error="deadline: no answer before the deadline", kind="deadline"))
        order = {name: i for i, name in enumerate(ens.members)}
        return sorted(outcomes, key=lambda o: order[o.member])

    def _deadline_at(self, ens: EnsembleConfig, request: GenerateRequest) -> float:
        seconds = ens.deadline_s if request.deadline_s is None else min(ens.deadline_s, request.deadline_s)
        return time.monotonic() + seconds

    def _degrade(self, staged: Staged, stage: str, model: str, error: BaseException) -> None:
        detail = error.message if isinstance(error, GatewayError) else f"{type(error).__name__}: {error}"
        if isinstance(error, TimeoutError):
            detail = "no result before the deadline"
            self.metrics.model_errors.labels("rank" if stage == "ranker" else "fuse", model).inc()
        logger.warning("%s %s failed; answering without it: %s", stage, model, detail)
        staged.degraded.append(f"{stage}_failed: {detail}")
        self.metrics.degraded.labels(staged.name, f"{stage}_failed").inc()

    async def stage(self, request: GenerateRequest) -> Staged:
        """Fan out and rank: everything before fusion. Raises the request's errors.

        A ranker that fails (or overruns the deadline) degrades the answer to the first
        candidate that arrived; ``Staged.degraded`` says why.
        """
        start = time.perf_counter()
        name, ens = self.ensemble(request.ensemble)
        self.check_limits(request)
        deadline_at = self._deadline_at(ens, request)
        top_k = request.top_k or ens.top_k
        if request.top_k is not None and request.top_k > len(ens.members):
            raise RequestError(
                f"top_k={request.top_k} exceeds the {len(ens.members)} members of ensemble {name!r}",
                param="top_k",
            )
        instruction = request.instruction if request.instruction is not None else ens.instruction
        text = input_text(request)

        fan_out_until = time.monotonic() + (deadline_at - time.monotonic()) * ens.members_share
        outcomes = await self.fan_out(ens, request, instruction, fan_out_until)
        t_members = time.perf_counter()
        ok = [o for o in outcomes if o.completion is not None]
        failed = [
            FailedMember(member=o.member, error=o.error or "", kind=o.kind) for o in outcomes if o.completion is None
        ]
        if len(ok) < ens.min_candidates:
            detail = "; ".join(f"{f.member}: {f.error}" for f in failed)
            msg = f"{len(ok)} of {len(ens.members)} members answered, {ens.min_candidates} needed ({detail})"
            if any(o.kind in ("timeout", "deadline") for o in outcomes if o.completion is None):
                raise DeadlineExceeded(msg, code="no_quorum")
            raise NoQuorumError(msg, code="no_quorum")

        completions = [o.completion for o in ok if o.completion is not None]
        fuser = self.fusers[ens.fuser] if ens.fuser is not None else None
        staged = Staged(
            name=name,
            request=request,
            instruction=instruction,
            input_text=text,
            members=[o.member for o in ok],
            completions=completions,
            failed=failed,
            scores=[None] * len(ok),
            ranks=list(range(1, len(ok) + 1)),
            order=list(range(len(ok))),
            selected=[],
            fuser=fuser,
            start=start,
            t_members=t_members,
            t_rank=t_members,
            deadline_at=deadline_at,
        )
        if ens.ranker is not None:
            ranker = self.rankers[ens.ranker]
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(deadline_at - time.monotonic()):
                    with self._model_errors("rank", f"ranker {ranker.name}", ranker.name):
                        ranking = await ranker.rank(instruction + text, [c.text for c in completions])
            except (GatewayError, TimeoutError) as e:
                self._degrade(staged, "ranker", ranker.name, e)
                staged.fuser = None
            else:
                self.metrics.ranker_latency.labels(ranker.name).observe(time.perf_counter() - t0)
                staged.scores = list(ranking.scores)
                staged.ranks = ranking.ranks
                staged.order = sorted(range(len(ok)), key=lambda i: (staged.ranks[i], i))
        if staged.fuser is not None:
            skip = self._skip_fusion(ens, staged)
            if skip is not None:
                self.metrics.fusion_skipped.labels(name, skip).inc()
                staged.fuser = None
        staged.selected = staged.order[: min(top_k, len(ok))] if staged.fuser is not None else staged.order[:1]
        staged.t_rank = time.perf_counter()
        return staged

    @staticmethod
    def _skip_fusion(ens: EnsembleConfig, staged: Staged) -> str | None:
        """Why fusion is not worth it for this request (adaptive fusion), or None to fuse."""
        if ens.fusion == "never":
            return "never"
        if ens.fusion == "always" or staged.degraded:
            return None
        if len(staged.order) < 2:
            return "single_candidate"
        best, second = (staged.scores[i] for i in staged.order[:2])
        if best is not None and second is not None and best - second >= ens.fusion_margin:
            return "margin"
        return None

    def _fusion_failed(self, staged: Staged, error: BaseException) -> str:
        assert staged.fuser is not None
        self._degrade(staged, "fuser", staged.fuser.name, error)
        staged.fuser = None
        staged.selected = staged.order[:1]
        return staged.completions[staged.order[0]].text

    async def fuse(self, staged: Staged) -> str:
        """The answer: the fuser's output, or the top candidate when the ensemble does not fuse
        or the fuser fails (then ``staged.degraded`` says so)."""
        if staged.fuser is None:
            return staged.completions[staged.order[0]].text
        fuser = staged.fuser
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(staged.deadline_at - time.monotonic()):
                with self._model_errors("fuse", f"fuser {fuser.name}", fuser.name):
                    output = await fuser.fuse(staged.instruction, staged.input_text, staged.selected_texts)
        except (GatewayError, TimeoutError) as e:
            return self._fusion_failed(staged, e)
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)
        return output

    async def fuse_stream(self, staged: Staged) -> AsyncIterator[str]:
        """The answer as it is generated; the pieces join to what ``fuse`` returns. A fuser that
        fails before its first piece degrades to the top candidate; after it, the error is raised."""
        if staged.fuser is None:
            yield staged.completions[staged.order[0]].text
            return
        fuser = staged.fuser
        t0 = time.perf_counter()
        pieces = fuser.fuse_stream(staged.instruction, staged.input_text, staged.selected_texts)
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
                    yield self._fusion_failed(staged, e)
                    return
                started = True
                yield piece
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)

    def finish(self, staged: Staged, output: str) -> GenerateResponse:
        """The response, and the per-member ranking metrics of a request that was answered."""
        t_end = time.perf_counter()
        for member in staged.members:
            self.metrics.candidates.labels(staged.name, member).inc()
        self.metrics.ranked_first.labels(staged.name, staged.members[staged.order[0]]).inc()
        for i in staged.selected:
            self.metrics.selected.labels(staged.name, staged.members[i]).inc()
        completions = staged.completions
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        completion_tokens = sum(c.completion_tokens for c in completions)
        candidates = None
        if staged.request.return_candidates:
            candidates = [
                Candidate(
                    member=staged.members[i],
                    text=completions[i].text,
                    score=staged.scores[i],
                    rank=staged.ranks[i],
                    latency_ms=round(completions[i].latency_ms, 3),
                    finish_reason=completions[i].finish_reason,
                )
                for i in staged.order
            ]
        ms = 1000.0
        extra: dict[str, object] = {
            "ensemble": staged.name,
            "candidates": len(staged.members),
            "failed": [f.member for f in staged.failed],
            "selected": [staged.members[i] for i in staged.selected],
            "total_ms": round((t_end - staged.start) * ms, 1),
        }
        if self.config.logging.log_prompts:
            extra.update(input=staged.input_text, output=output)
        self.status.answer(
            id=staged.id,
            ensemble=staged.name,
            ranking=[
                {"member": staged.members[i], "score": staged.scores[i], "rank": staged.ranks[i]} for i in staged.order
            ],
            selected=[staged.members[i] for i in staged.selected],
            failed=[f.member for f in staged.failed],
            fused=staged.fuser is not None,
            degraded=bool(staged.degraded or staged.failed),
            total_ms=(t_end - staged.start) * ms,
        )
        logger.info("answered", extra=extra)
        return GenerateResponse(
            id=staged.id,
            ensemble=staged.name,
            output=output,
            fused=staged.fuser is not None,
            selected=[staged.members[i] for i in staged.selected],
            candidates=candidates,
            failed_members=staged.failed,
            degraded=bool(staged.degraded or staged.failed),
            degraded_reasons=[*staged.degraded, *(f"member {f.member}: {f.error}" for f in staged.failed)],
            timings_ms=Timings(
                members=round((staged.t_members - staged.start) * ms, 3),
                rank=round((staged.t_rank - staged.t_members) * ms, 3),
                fuse=round((t_end - staged.t_rank) * ms, 3),
                total=round((t_end - staged.start) * ms, 3),
            ),
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    async def run(self, request: GenerateRequest) -> GenerateResponse:
        staged = await self.stage(request)
        return self.finish(staged, await self.fuse(staged))
