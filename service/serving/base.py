"""What every API's serving class shares: the current pipeline, the request's account, and a
query's stream as the chunk-shaped APIs send it."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping

from service.errors import GatewayError
from service.pipeline.pipeline import AnswerStream, Pipeline
from service.pipeline.plan import ensemble_label
from service.pipeline.types import Origin, Query
from service.protocol import error_payload
from service.serving.accounting import Account
from service.serving.sse import DONE, AnswerEvents, sse


class Serving:
    """What every API's serving class shares: the current pipeline, the request's account, and a
    query's answer, whole or as a stream."""

    api = "generate"  # how the store names the API

    def __init__(self, pipeline: Pipeline, account: Account):
        self.pipeline = pipeline
        self.account = account

    def begin(
        self,
        query: Query,
        metadata: Mapping[str, str] | None = None,
        echo: Mapping[str, object] | None = None,
        retrievable: bool = True,
    ) -> Query:
        """Label the request's account with the ensemble the query names; the query with its origin
        (this API, the client's key id and metadata; what its stored object repeats)."""
        self.account.ensemble = ensemble_label(self.pipeline.config, query.ensemble)
        origin = Origin(self.api, self.account.key_id, metadata, echo, retrievable)
        return dataclasses.replace(query, origin=origin)

    def events(self, stream: AnswerStream, events: AsyncIterator[str]) -> AnswerEvents:
        """The chunk-shaped APIs' stream: their events; an error as one OpenAI error event; ``[DONE]``."""
        return AnswerEvents(stream, self.account, events, _error_event, [DONE])


def _error_event(error: GatewayError) -> list[str]:
    return [sse(error_payload(error))]
