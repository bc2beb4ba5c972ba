"""A Flan-T5-shaped checkpoint built offline: a T5 v1.1 model (gated-gelu, untied embeddings) with
random weights and a SentencePiece-style Unigram tokenizer with T5's conventions, saved as a plain
Hugging Face directory, so tests and benchmarks load it by path exactly as `google/flan-t5-small`.
It writes no streamrec metadata: what loads it must cope with a hub checkpoint as it comes."""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration, T5Tokenizer
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)
# transformers 5 draws a progress bar for every save and load.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

# What makes a T5 a v1.1 / Flan one, whatever its size: gated-gelu, its own output head, T5's ids.
T5_V1_1: dict[str, Any] = {
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

# google/flan-t5-small's config.json, the dimensions that decide speed. Its tokenizer has 32,100
# tokens (32,000 SentencePiece pieces and 100 <extra_id_N>); the embedding is padded to 32,128.
FLAN_T5_SMALL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 8,
    "num_decoder_layers": 8,
    "num_heads": 6,
    **T5_V1_1,
}
FLAN_T5_SMALL_TOKENIZER = 32100

# The tests' default: Flan's architecture at a size that trains in seconds on a CPU. No vocab_size:
# the embedding is the tokenizer's size rounded up to a multiple of 128, as Flan pads 32,100 to 32,128,
# so the model is wider than the tokenizer, as with the real checkpoint.
SMALL_FLAN: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    **T5_V1_1,
}

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's order
MODEL_MAX_LENGTH = 512  # Flan's tokenizer_config.json


def train_unigram_tokenizer(texts: Iterable[str], vocab_size: int, extra_ids: int = 100) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (transformers' T5Tokenizer, the class Flan's tokenizer_config.json names)
    over a Unigram model trained here with `tokenizers`: `<pad>`=0, `</s>`=1, `<unk>`=2, the `▁`
    Metaspace, case kept, EOS appended to every encoding, and `<extra_id_0..extra_ids-1>` as the top
    ids in reverse (`<extra_id_0>` is the last), as in T5. Every printable ASCII character is a piece,
    so any identifier built from them (an item id after `#`) encodes without `<unk>`.

    `vocab_size` counts the extra ids, like Flan's 32,100. A corpus too small to fill it gives fewer
    pieces (the Unigram trainer stops when no substring is worth a piece): the tokenizer is then
    smaller than asked, its extra ids still on top, and a warning says by how much. No normaliser:
    transformers rebuilds a T5Tokenizer from tokenizer.json with only a SentencePiece precompiled
    charsmap as normaliser, so one set here would be gone after `from_pretrained`; training without
    one keeps the tokenizer built here and the one loaded from disk identical."""
    if vocab_size <= extra_ids + len(SPECIAL_TOKENS) + len(string.printable):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for pieces beside {extra_ids} extra ids")
    tok = Tokenizer(models.Unigram())
    # What T5Tokenizer itself uses: runs of whitespace are one separator, each word gets "▁".
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - extra_ids,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        initial_alphabet=sorted(set(string.printable) - set(string.whitespace)),
        show_progress=False,
    )
    corpus = list(texts)
    # The trainer seeds its pieces with the substrings found in two or more distinct words, so a word
    # seen in one form only could never become a piece (SentencePiece seeds over sentences, where a
    # common word repeats). Each word also seen with a full stop after it makes every word a candidate.
    corpus += [" ".join(f"{w}." for w in t.split()) for t in corpus]
    tok.train_from_iterator(corpus, trainer=trainer)
    pieces = [(str(p), float(s)) for p, s in json.loads(tok.to_str())["model"]["vocab"]]
    if [p for p, _ in pieces[:3]] != SPECIAL_TOKENS:
        raise RuntimeError(f"the Unigram trainer put {pieces[:3]} first, not {SPECIAL_TOKENS}")
    if len(pieces) + extra_ids < vocab_size:
        log.warning(
            "the corpus fills %d of the %d pieces asked for: the tokenizer has %d tokens (with %d extra ids)",
            len(pieces),
            vocab_size - extra_ids,
            len(pieces) + extra_ids,
            extra_ids,
        )
    # The trainer is not deterministic: from run to run its scores move in the third decimal, and
    # with them the order of the pieces. Numbered in text order, the ids depend only on which pieces
    # were kept, so one corpus gives one numbering.
    pieces = pieces[:3] + sorted(pieces[3:])
    vocab = pieces + [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    fast: PreTrainedTokenizerFast = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=MODEL_MAX_LENGTH)
    return fast


def untie_lm_head(model: T5ForConditionalGeneration) -> None:
    """Give `model` an output embedding of its own, as T5 v1.1 has. transformers 5 ties a T5 built
    from a config whatever its tie_word_embeddings says (and saves only the shared matrix); it
    unties one only when loading a checkpoint that holds two different matrices, as Flan's does."""
    shared = model.shared.weight
    # std d_model ** -0.5: the decoder's outputs are not rescaled in v1.1, so this keeps a random
    # model's logits near uniform instead of spread over tens of nats.
    head = torch.nn.Parameter(torch.randn_like(shared) * model.config.d_model**-0.5)
    model.lm_head.weight = head
    model.all_tied_weights_keys.pop("lm_head.weight", None)


def build_flan_checkpoint(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    config: dict[str, Any] | None = None,
    vocab_size: int = FLAN_T5_SMALL_TOKENIZER,
    extra_ids: int = 100,
    seed: int = 0,
) -> Path:
    """Write a Flan-T5-shaped checkpoint to `out_dir`: a T5 v1.1 model with `config`'s dimensions
    (default SMALL_FLAN; FLAN_T5_SMALL for the real size) and random weights drawn from `seed`, and
    the Unigram tokenizer trained on `texts` with `vocab_size` tokens at most. The embedding has
    `config["vocab_size"]` rows when given (at least the tokenizer's size), else the tokenizer's size
    rounded up to a multiple of 128. Files: config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, as a hub download has them."""
    dims = dict(SMALL_FLAN if config is None else config)
    tokenizer = train_unigram_tokenizer(texts, vocab_size, extra_ids)
    size = len(tokenizer)
    rows = int(dims.pop("vocab_size", 0)) or -(-size // 128) * 128
    if rows < size:
        raise ValueError(f"config vocab_size {rows} is smaller than the tokenizer ({size} tokens)")
    # T5 v1.1: gated-gelu feed-forward, input and output embeddings apart (not scaled by d_model).
    forced = ("feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id", "decoder_start_token_id")
    dims |= {key: T5_V1_1[key] for key in forced}
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(vocab_size=rows, **dims))
    untie_lm_head(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # Flan's config.json as the hub has it: transformers 5 writes tie_word_embeddings true whatever
    # the weights are, and reads it back as "scale the decoder outputs", the T5 v1.0 behaviour.
    cfg_file = out / "config.json"
    saved = json.loads(cfg_file.read_text())
    saved.pop("scale_decoder_outputs", None)
    cfg_file.write_text(json.dumps(saved | {"tie_word_embeddings": False}, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    # transformers 5 no longer writes this file; hub checkpoints such as Flan's still carry it.
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    (out / "special_tokens_map.json").write_text(json.dumps({**specials, "additional_special_tokens": extra}, indent=2))
    return out
