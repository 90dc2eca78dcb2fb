"""What the project's checkpoints hold besides their weights, shared by the tiny random ones and the
trained ones: a member's tokenizer with the chat template vLLM applies, and a PairRM-hf
checkpoint's DeBERTa-style tokenizer with PairRM's four markers and the config fields llm-blender's
``DebertaV2PairRM`` reads."""

from __future__ import annotations

from typing import Any

# Members are served as chat models: vLLM renders a request with this template (the tokenizer's).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MEMBER_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

PAIRRM_MARKERS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")
DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def member_tokenizer(tok: Any) -> Any:
    """A ``tokenizers.Tokenizer`` (holding ``MEMBER_SPECIALS``) as a member's fast tokenizer: bos
    ``<s>``, eos and pad ``</s>``, and the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pairrm_tokenizer(tok: Any) -> Any:
    """A ``tokenizers.Tokenizer`` (holding ``DEBERTA_SPECIALS``) as PairRM's fast tokenizer:
    ``[CLS] text [SEP]`` per encode, and the marker tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=2048,
    )
    fast.add_special_tokens({"additional_special_tokens": list(PAIRRM_MARKERS)})
    return fast


def pairrm_model(fast: Any, seed: int, **sizes: Any) -> Any:
    """A freshly initialised ``DebertaV2PairRM`` for ``fast`` (sizes: hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size, position_buckets, and any other DebertaV2Config field)."""
    import torch
    from transformers import DebertaV2Config

    from service.models.compat import import_pairrm

    config = DebertaV2Config(
        vocab_size=len(fast),
        max_position_embeddings=2048,
        relative_attention=True,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=fast.pad_token_id,
        **sizes,
    )
    ids = {t: fast.convert_tokens_to_ids(t) for t in PAIRRM_MARKERS}
    config.n_tasks = 1
    config.drop_out = 0.05
    config.sep_token_id = fast.sep_token_id
    config.source_prefix_id = ids["<|source|>"]
    config.cand1_prefix_id = ids["<|candidate1|>"]
    config.cand2_prefix_id = ids["<|candidate2|>"]
    config.cand_prefix_id = ids["<|candidate|>"]
    torch.manual_seed(seed)
    return import_pairrm()(config)
