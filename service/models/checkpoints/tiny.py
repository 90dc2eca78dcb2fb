"""Deterministic tiny checkpoints of the real architectures, for the demo and the tests.

Writes, from fixed seeds and with tokenizers trained on the spot (no hub needed):

- ``llama-a``, ``llama-b``: Llama causal LMs that vLLM-CPU serves (head_dim 64), each with
  its own byte-level BPE tokenizer and a chat template;
- ``pairrm``: a PairRM-hf checkpoint (``DebertaV2PairRM``) whose tokenizer holds
  ``<|source|>``, ``<|candidate1|>``, ``<|candidate2|>`` and adds CLS/SEP like DeBERTa's;
- ``genfuser``: a T5 seq2seq checkpoint whose tokenizer knows ``</s>`` and ``<extra_id_N>``;
- ``llama-a-lora-1``, ``llama-a-lora-2``: PEFT LoRA adapters over ``llama-a`` (ranks 8 and 4);
- ``llama-a-soft-1``: a PEFT prompt-tuning checkpoint (8 virtual tokens) over ``llama-a``.

The weights are random: the text these models produce is noise by design. What is real is the
architecture, the file formats and every code path that loads and runs them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any

from service.models.checkpoints.corpus import corpus

logger = logging.getLogger(__name__)

# Bump when a generator changes: checkpoints written by another version are rewritten.
GENERATOR_VERSION = 2

FUSER_EXTRA_IDS = 100


def _llama_tokenizer(seed: int, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from service.models.checkpoints.formats import MEMBER_SPECIALS, member_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=MEMBER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return member_tokenizer(tok)


def make_llama(out: Path, seed: int, layers: int, vocab_size: int = 512) -> None:
    """A Llama causal LM: hidden 128, 2 heads of 64, 1 KV head (vLLM-CPU needs head_dim 64)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _llama_tokenizer(seed, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger output weights give peaked next-token distributions, so members differ visibly.
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _unigram_tokenizer(seed: int, specials: list[str], unk: str) -> Any:
    """A SentencePiece-style (Metaspace + Unigram) tokenizer whose vocabulary is built from the
    corpus word counts. Built, not trained: the ``tokenizers`` Unigram trainer gives a different
    vocabulary on every run, and checkpoints must be reproducible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    counts: Counter[str] = Counter()
    for line in corpus(seed):
        for word in line.split():
            counts["\u2581" + word] += 1
    total = sum(counts.values())
    vocab: dict[str, float] = {s: 0.0 for s in specials}
    for piece, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(piece, math.log(count / total))
    for ch in string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, -20.0)
        vocab.setdefault("\u2581" + ch, -20.0)
    vocab.setdefault("\u2581", -20.0)
    tok = Tokenizer(models.Unigram(list(vocab.items()), unk_id=specials.index(unk)))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def make_pairrm(out: Path, seed: int = 7) -> None:
    """A PairRM-hf checkpoint: DeBERTa-v2 encoder + PairRM head, DeBERTa-style tokenizer."""
    import torch

    from service.models.checkpoints.formats import DEBERTA_SPECIALS, pairrm_model, pairrm_tokenizer

    fast = pairrm_tokenizer(_unigram_tokenizer(seed, DEBERTA_SPECIALS, unk="[UNK]"))
    model = pairrm_model(
        fast,
        seed,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        position_buckets=256,
        initializer_range=0.2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    with torch.no_grad():
        # At the default init the scores sit near 1e-3; the wider init above and a scaled head
        # give scores of order 1, so parity checks at 1e-4 mean something.
        for layer in model.head_layer:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.5)
                layer.bias.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def make_genfuser(out: Path, seed: int = 11) -> None:
    """A T5 seq2seq checkpoint shaped like Flan-T5 (gated-gelu), tokenizer with T5's specials."""
    import torch
    from tokenizers import processors
    from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    extra = [f"<extra_id_{i}>" for i in range(FUSER_EXTRA_IDS)]
    tok = _unigram_tokenizer(seed, ["<pad>", "</s>", "<unk>"], unk="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1024,
    )
    fast.add_special_tokens({"additional_special_tokens": extra})
    config = T5Config(
        vocab_size=len(fast),
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        decoder_start_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
        # A damped end-of-sequence row: random weights would otherwise often end at once.
        model.lm_head.weight[fast.eos_token_id] *= 0.1
    model.generation_config = GenerationConfig(
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        decoder_start_token_id=fast.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def make_lora(out: Path, base: Path, seed: int, rank: int = 8) -> None:
    """A PEFT LoRA adapter over ``base`` with random A and B (PEFT's default B=0 would be a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))


def make_soft_prompt(out: Path, base: Path, seed: int, virtual_tokens: int = 8) -> None:
    """A PEFT prompt-tuning checkpoint (``prompt_embeddings`` [virtual_tokens, hidden]) for ``base``."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
        token_dim=model.config.hidden_size,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    peft_model.save_pretrained(str(out))


TINY_MODELS = {
    "llama-a": lambda out: make_llama(out, seed=1, layers=2),
    "llama-b": lambda out: make_llama(out, seed=2, layers=3),
    "llama-a-lora-1": lambda out: make_lora(out, out.parent / "llama-a", seed=21),
    "llama-a-lora-2": lambda out: make_lora(out, out.parent / "llama-a", seed=22, rank=4),
    "llama-a-soft-1": lambda out: make_soft_prompt(out, out.parent / "llama-a", seed=31),
    "pairrm": make_pairrm,
    "genfuser": make_genfuser,
}


def make_tiny_models(root: Path, force: bool = False) -> dict[str, Path]:
    """Write every tiny checkpoint under ``root``; existing complete ones are kept."""
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, build in TINY_MODELS.items():
        out = root / name
        marker = out / ".complete"
        stamp = json.dumps({"name": name, "version": GENERATOR_VERSION})
        if marker.exists() and marker.read_text() == stamp and not force:
            logger.info("tiny model %s already at %s", name, out)
        else:
            logger.info("writing tiny model %s to %s", name, out)
            start = time.perf_counter()
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            build(out)
            marker.write_text(stamp)
            logger.info("tiny model %s written in %.1fs", name, time.perf_counter() - start)
        written[name] = out
    return written
