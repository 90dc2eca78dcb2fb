"""The trained router: a PairRM checkpoint's own encoder embeds the source (instruction + input,
tokenized as PairRM tokenizes a source; the last layer's states averaged over its tokens, unit
length), and a model over those embeddings gives each member's chance of being chosen:

- ``knn``: the labels of the ``k`` most similar training sources, each member averaged over the
  neighbours where it answered (a member not asked there is unknown, not wrong);
- ``linear``: one logistic unit per member on the embedding.

A checkpoint is a directory: ``router.json`` (kind, members, encoder, settings, what training
measured) and ``router.npz`` (kNN: the embeddings and labels, NaN where unknown; linear: the weights).
``ensemble-gateway train-router`` writes it (``service.quality.train_router``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.config import RouterConfig
from service.errors import ConfigError
from service.models.compat import load_pairrm
from service.models.rankers.pairinput import SOURCE_PREFIX, strip_markers

logger = logging.getLogger(__name__)

FORMAT = "ensemble-gateway-router/1"
SOURCE_MAX_LENGTH = 512  # tokens of the source embedded at most


class Embedder:
    """A PairRM checkpoint's encoder as a sentence embedder (blocking: call it from a worker thread)."""

    def __init__(self, checkpoint: str, device: str = "cpu", dtype: str = "float32"):
        import torch

        self._torch = torch
        self.checkpoint = checkpoint
        self.device = device
        self.tokenizer, model = load_pairrm(checkpoint, dtype, device)
        self.encoder = model.pretrained_model
        self.dim = int(self.encoder.config.hidden_size)

    def ids(self, source: str) -> list[int]:
        return list(
            self.tokenizer.encode(SOURCE_PREFIX + strip_markers(source), max_length=SOURCE_MAX_LENGTH, truncation=True)
        )

    def embed(self, sources: list[str], batch: int = 64) -> np.ndarray:
        """[len(sources), dim] float32 rows of unit length."""
        torch = self._torch
        out = np.zeros((len(sources), self.dim), dtype=np.float32)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # similar lengths pad less
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            seqs = [self.ids(sources[i]) for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            with torch.inference_mode():
                hidden = self.encoder(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
                m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[rows] = pooled.cpu().numpy()
        return out


@dataclass
class RouterModel:
    """What a checkpoint holds, and the prediction from an embedding (numpy only)."""

    kind: str  # knn | linear
    members: list[str]
    encoder: str
    arrays: dict[str, np.ndarray]
    k: int = 16
    info: dict[str, Any] | None = None

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, members]: each member's chance of being chosen, for each row of ``embeddings``."""
        if self.kind == "linear":
            z = embeddings @ self.arrays["weight"] + self.arrays["bias"]
            return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float32)
        keys, labels = self.arrays["embeddings"], self.arrays["labels"]
        prior = np.nan_to_num(np.nanmean(labels, axis=0) if len(labels) else np.full(len(self.members), 0.5), nan=0.5)
        sims = embeddings @ keys.T  # [n, train]
        k = min(self.k, keys.shape[0])
        out = np.empty((embeddings.shape[0], len(self.members)), dtype=np.float32)
        for r in range(embeddings.shape[0]):
            near = np.argpartition(-sims[r], k - 1)[:k] if k else np.zeros(0, dtype=int)
            weights = np.clip(sims[r, near], 1e-6, None)[:, None]
            known = ~np.isnan(labels[near])
            total = (weights * known).sum(0)
            mean = (weights * np.nan_to_num(labels[near])).sum(0) / np.where(total > 0, total, 1)
            out[r] = np.where(total > 0, mean, prior)
        return out

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "router.npz").open("wb") as f:
            np.savez(f, **self.arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        meta = {"format": FORMAT, "kind": self.kind, "members": self.members, "encoder": self.encoder, "k": self.k}
        (out / "router.json").write_text(json.dumps({**meta, "trained": self.info or {}}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> RouterModel:
        try:
            meta = json.loads((path / "router.json").read_text())
            with np.load(path / "router.npz") as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as e:
            raise ConfigError(f"router checkpoint {path}: {e}") from e
        if meta.get("format") != FORMAT:
            raise ConfigError(f"router checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(
            meta["kind"],
            list(meta["members"]),
            str(meta["encoder"]),
            arrays,
            int(meta.get("k", 16)),
            meta.get("trained"),
        )


class EncoderRouter:
    """A trained router in the gateway: one worker thread owns the encoder (its thread budget set
    there, as the ranker's is), so embedding never runs on the event loop."""

    def __init__(self, name: str, config: RouterConfig):
        import torch

        assert config.checkpoint is not None  # the config's validation requires it
        start = time.perf_counter()
        self.name = name
        self.model = RouterModel.load(Path(config.checkpoint))
        threads = config.threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"router-{name}", initializer=torch.set_num_threads, initargs=(threads,)
        )
        try:
            self.embedder = Embedder(config.encoder or self.model.encoder, config.device, config.dtype)
        except OSError as e:
            self._pool.shutdown()
            raise ConfigError(f"routers.{name}.encoder: {e}") from e
        logger.info(
            "router %s (%s, %d members) loaded in %.1fs",
            name,
            self.model.kind,
            len(self.model.members),
            time.perf_counter() - start,
        )

    def scores_sync(self, source: str) -> dict[str, float]:
        p = self.model.predict(self.embedder.embed([source]))[0]
        return {m: float(v) for m, v in zip(self.model.members, p, strict=True)}

    async def scores(self, source: str) -> dict[str, float]:
        return await asyncio.wrap_future(self._pool.submit(self.scores_sync, source))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
