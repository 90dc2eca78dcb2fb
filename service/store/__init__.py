"""The store of answers and feedback: every answer's evidence, written off the request path, and
what clients say about it; the data the ranker (and later the router) learns from."""

from service.store.records import AnswerRecord, FeedbackRecord, config_digest
from service.store.store import Store, store_url

__all__ = ["AnswerRecord", "FeedbackRecord", "Store", "config_digest", "store_url"]
