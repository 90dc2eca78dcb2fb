"""Tokenizers for the trained checkpoints, built with the ``tokenizers`` library from the suite.

- members: a character-level WordLevel tokenizer (base A) and a byte-level BPE trained on the
  suite's chat texts (base B), both with the chat template vLLM applies and no automatic BOS, so a
  templated prompt tokenizes the same way in training, in ``transformers`` and in vLLM;
- ranker and fuser: a Unigram tokenizer whose vocabulary is built (not trained, so it is
  reproducible): the suite's fixed words are single pieces, everything else falls apart into
  characters, which keeps inputs short while a reversed or sorted word stays visible letter by letter.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from service.models.checkpoints import formats
from service.quality import suite

FUSER_EXTRA_IDS = 100
SPACE = "\u2581"
ALPHABET = string.ascii_letters + string.digits + " .,:?!'-\n"


def suite_words() -> list[str]:
    """The words of the suite's prompts and of the GenFuser template, countries and cities included."""
    fixed = (
        "What is plus and what Reverse the word Sort letters capital of Instruction Input Candidate "
        "Summarize candidates into a better one for given instruction"
    )
    return sorted({*fixed.split(), *suite.CAPITALS, *suite.CAPITALS.values()})


def _member_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast: PreTrainedTokenizerFast = formats.member_tokenizer(tok)
    return fast


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` (others map to ``<unk>``), plus the chat specials."""
    vocab = {t: i for i, t in enumerate(formats.MEMBER_SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(formats.MEMBER_SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _member_fast(tok)


def bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` (digits kept one per token), plus the chat specials."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=formats.MEMBER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _member_fast(tok)


def _word_unigram(words: Iterable[str], specials: Sequence[str], unk: str, bigrams: bool = False) -> Tokenizer:
    """Unigram over a built vocabulary: each word (lowercase ones only after a space, capitalized
    ones also glued to punctuation) is one piece, characters are expensive fallbacks. Random
    lowercase letter strings therefore split into single characters, or with ``bigrams`` into
    letter pairs (plus one character when their length is odd)."""
    vocab: dict[str, float] = {s: 0.0 for s in specials}
    for word in sorted(set(words)):
        vocab.setdefault(SPACE + word, -2.0)
        if word[:1].isupper():
            vocab.setdefault(word, -2.0)
    for ch in ALPHABET.replace(" ", "").replace("\n", ""):
        vocab.setdefault(ch, -10.0)
        vocab.setdefault(SPACE + ch, -10.5)
    vocab.setdefault(SPACE, -10.0)
    if bigrams:
        for a in string.ascii_lowercase:
            for b in string.ascii_lowercase:
                vocab.setdefault(a + b, -15.0)
    tok = Tokenizer(models.Unigram(list(vocab.items()), unk_id=list(vocab).index(unk)))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    return tok


def pairrm_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """DeBERTa-style ([CLS] text [SEP]) with PairRM's four marker tokens."""
    fast: PreTrainedTokenizerFast = formats.pairrm_tokenizer(_word_unigram(words, formats.DEBERTA_SPECIALS, "[UNK]"))
    return fast


def fuser_tokenizer(words: Iterable[str], bigrams: bool = True) -> PreTrainedTokenizerFast:
    """T5-style (text </s>) with ``<extra_id_N>`` sentinels; with ``bigrams`` letter pairs are single
    pieces (half the tokens a candidate word takes to copy), else every letter is one."""
    tok = _word_unigram(words, ["<pad>", "</s>", "<unk>"], "<unk>", bigrams=bigrams)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=1024
    )
    fast.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(FUSER_EXTRA_IDS)]})
    return fast
