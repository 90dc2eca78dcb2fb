"""What the serving classes read back from the store: an answer's record, only for the key that
created it (another key's id is answered as unknown, as OpenAI does)."""

from __future__ import annotations

from typing import Any

from service.errors import NotFoundError, RequestError
from service.protocol import answer_key
from service.store import Store


def store_or_refuse(store: Store | None, what: str, param: str | None = None) -> Store:
    if store is None:
        raise RequestError(
            f"{what} needs the store: the gateway's configuration has no `store`", param=param, code="store_disabled"
        )
    return store


async def owned_answer(
    store: Store, given: str, key_id: str | None, param: str, what: str, retrievable: bool = False
) -> dict[str, Any]:
    """The answer ``given`` names (any API's spelling of its id), if ``key_id`` created it (and,
    with ``retrievable``, if it may be read again: the Responses API's ``store``); else 404."""
    row = await store.answer(answer_key(given))
    if row is None or row["key_id"] != key_id or (retrievable and not row["retrievable"]):
        raise NotFoundError(f"no {what} with id {given!r}", param=param, code="not_found")
    return row
