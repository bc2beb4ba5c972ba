"""The model: load a T5 / Flan-T5 checkpoint (hub id or directory, safetensors only) or build the
offline `tiny` T5 with a locally trained tokenizer, and turn many histories into ranked, valid item
lists in one call (beam search constrained by the item trie). The only module that imports torch,
transformers or peft; everything it decides with comes from the pure core."""

from __future__ import annotations

import copy
import json
import math
import shutil
import string
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import groupby
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils import logging as hf_logging
from transformers.utils.hub import cached_file, get_checkpoint_shard_files

from streamrec.catalog import (
    Catalog,
    ItemTrie,
    SchemeName,
    ScoredItem,
    TrieNode,
    build_trie,
    identifiers,
    item_of_token,
    item_token,
    item_tokens_to_add,
)
from streamrec.codes import (
    CODEBOOK_FILE,
    CODES_FILE,
    Code,
    SemanticIds,
    code_source,
    fit_semantic_ids,
    merged_codes,
    read_codes,
    write_codes,
)
from streamrec.errors import ModelError
from streamrec.events import ModelVersion
from streamrec.instructions import DEFAULT_TEMPLATES, Instructions, RecRequest, item_texts
from streamrec.model.blend import Blend, top_k
from streamrec.registry import BLEND
from streamrec.settings import TrainSettings

# transformers 5 draws a progress bar for every load and save; a worker's log has no use for them.
hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

META_FILE = "streamrec.json"
TEMPLATES_FILE = "instructions.toml"
# {item_id: token_id} under `item_token`, beside a saved model and in each adapter (under its sha256).
ITEM_TOKENS_FILE = "item_tokens.json"
DEFAULT_TASK = "next_click"
# An inference worker's headroom for items that reach its catalog between two artifacts (see
# `set_catalog`): at least this many spare embedding rows, or this share of the vocabulary.
SPARE_ROWS = 256
SPARE_SHARE = 0.25


def _train_default(name: str) -> Any:
    return TrainSettings.model_fields[name].default


@dataclass(frozen=True)
class TinyConfig:
    """Size of the offline `tiny` T5. Item tokens share input and output embeddings (tied), which is
    what lets a from-scratch model learn item-to-item structure from short histories.

    The defaults are TrainSettings' (STREAMREC_TRAIN__D_MODEL, ...), the one place they are set and
    documented, so a model built here is the one `streamrec train` builds."""

    d_model: int = _train_default("d_model")
    d_ff: int = _train_default("d_ff")
    num_layers: int = _train_default("num_layers")
    num_decoder_layers: int = _train_default("num_decoder_layers")
    num_heads: int = _train_default("num_heads")
    dropout: float = _train_default("dropout")
    text_vocab: int = _train_default("text_vocab")
    max_input_tokens: int = 160  # not a training setting: a saved model carries its own

    @classmethod
    def from_settings(cls, train: TrainSettings) -> TinyConfig:
        """The tiny model these training settings describe."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls) if f.name in TrainSettings.model_fields})


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """What a model computes in (STREAMREC_MODEL__DTYPE): `auto` is bf16 on a CUDA device that has
    it and fp32 elsewhere, since bf16 matmuls are slower than fp32 on most CPUs."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be auto, {' or '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling of the setting, for reports and logs."""
    return str(dtype).removeprefix("torch.")


# What transformers and huggingface_hub raise when a checkpoint cannot be had: OSError (missing
# files, the hub's own errors, offline without a cached copy), ValueError (a malformed id or config),
# and, with the hub unreachable, httpx's errors or the RuntimeError of its closed client.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, httpx.HTTPError)


def load_error(path_or_id: str, exc: BaseException) -> ModelError:
    """The ModelError for a checkpoint that did not load, naming what fixes it."""
    cause = f"{type(exc).__name__}: {exc}"
    if Path(path_or_id).is_dir():
        return ModelError(
            f"cannot load the model directory {path_or_id!r}: {cause}. It needs config.json, safetensors weights "
            "and the tokenizer files, as `streamrec train` or save_pretrained write them."
        )
    return ModelError(
        f"cannot load model {path_or_id!r}: it is not a local directory, and neither the Hugging Face cache nor the "
        f"hub provided it ({cause}). Fixes: (1) set STREAMREC_MODEL__BASE to a local model directory (one "
        "written by `streamrec train`, or a checkpoint saved with save_pretrained; safetensors weights); (2) put "
        f"the model in the Hugging Face cache (HF_HOME, default ~/.cache/huggingface), e.g. `hf download "
        f"{path_or_id}` on a machine that reaches the hub, or let this one reach it (network, HTTPS_PROXY, "
        "HF_ENDPOINT); (3) with the model cached, set HF_HUB_OFFLINE=1 so it is read from the cache without "
        "asking the hub."
    )


def check_loadable(path_or_id: str) -> None:
    """Raise the ModelError `Recommender.load` would, without building the model: the config, the
    tokenizer and the safetensors weights of a directory, of a hub id (downloaded into the Hugging
    Face cache now, where `load` finds them later) or of a LoRA directory's base. Workers call it at
    start, so a base that cannot be loaded stops them before they join a consumer group."""
    path = Path(path_or_id)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        check_loadable(str(base))
        return
    try:
        T5Config.from_pretrained(path_or_id)
        AutoTokenizer.from_pretrained(path_or_id)
        if cached_file(path_or_id, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False) is None:
            index = cached_file(path_or_id, SAFE_WEIGHTS_INDEX_NAME)  # sharded weights; raises when missing too
            if index is None:
                raise OSError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")
            get_checkpoint_shard_files(path_or_id, index)  # type: ignore[no-untyped-call]
    except LOAD_ERRORS as exc:
        raise load_error(path_or_id, exc) from exc


def train_tokenizer(texts: Iterable[str], vocab_size: int, item_tokens: Sequence[str]) -> PreTrainedTokenizerFast:
    """A T5-shaped tokenizer (<pad>=0, </s>=1, <unk>=2, EOS appended) trained with `tokenizers` on
    the given text, plus one added token per item."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    # normalized=False: an item token is matched on the raw text, before lowercasing; lstrip: it
    # swallows the space before it, which would otherwise cost a lone "▁" token per history item.
    tok.add_tokens([AddedToken(t, normalized=False, lstrip=True) for t in item_tokens])
    # transformers 5 renamed the class (TokenizersBackend); the old name is kept as an alias.
    fast: PreTrainedTokenizerFast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    return fast


class Recommender:
    """A T5 model, its tokenizer, a catalog with its trie, and the instruction templates.

    `recommend` is safe to call from a worker thread; `load_adapter` swaps a LoRA adapter between
    two batches (a lock keeps a batch from seeing half of a swap)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        scheme: SchemeName,
        instructions: Instructions,
        device: torch.device,
        base: str,
        task: str = DEFAULT_TASK,
        max_input_tokens: int = 512,
        num_beams: int | None = None,
        batch_size: int = 64,
        dtype: str = "auto",
        train: bool = False,
    ) -> None:
        # Served weights are cast to the compute dtype; a model about to train keeps fp32 weights
        # (AdamW's updates vanish in bf16's 8-bit mantissa) and computes under autocast instead.
        self.dtype = resolve_dtype(dtype, device)
        self.model = model.to(device=device, dtype=torch.float32 if train else self.dtype).eval()
        self.tokenizer = tokenizer
        # The ids the checkpoint's own tokenizer names, the same in every process that loads it.
        self.base_vocab = len(tokenizer)
        # Over-long instructions lose their oldest history items, never the newest or the question.
        self.tokenizer.truncation_side = "left"
        # bf16 autocast on CUDA when that is the compute dtype; the CPU never autocasts.
        self.autocast = device.type == "cuda" and self.dtype == torch.bfloat16
        self.scheme: SchemeName = scheme
        self.instructions = instructions
        self.device = device
        self.base = base
        self.task = task
        self.max_input_tokens = max_input_tokens
        # What `recommend` and `item_log_probs` use unless told otherwise (STREAMREC_MODEL__NUM_BEAMS,
        # __BATCH_SIZE); None beams: max(k, 4).
        self.num_beams = num_beams
        self.batch_size = batch_size
        # Multi-token schemes rank a finished identifier by log P / length ** length_penalty
        # (STREAMREC_MODEL__LENGTH_PENALTY); 0: by log P itself, which lets the search stop early.
        self.length_penalty = 0.0
        # Complete each beam search into the exact top k (STREAMREC_MODEL__EXACT_SEARCH): see _complete.
        self.exact_search = False
        self.adapter_version: str | None = None
        # Whether `set_catalog` gives items new to the tokenizer a token: the trainer's role. An
        # inference worker leaves it off and takes new items' ids from the artifacts it serves, since
        # its own order of arrival differs from the trainer's.
        self.extends_items = True
        # Whether items that no artifact names yet are served at once from provisional ids of this
        # process's own (the inference worker's role): ids that are never saved, and that give way
        # to the mapping of the next model or adapter loaded. See `set_catalog`.
        self.provisional_items = False
        self._provisional: frozenset[str] = frozenset()
        self._official_tokenizer: Any = None  # the tokenizer before the provisional tokens
        self._lock = threading.RLock()
        self.catalog = Catalog([])
        self.names: dict[str, str] = {}
        self.texts: dict[str, tuple[str, str]] = {}
        self.trie = ItemTrie({})
        self._single: dict[int, str] = {}
        self._single_items: list[str] = []
        self._single_tokens = torch.zeros(0, dtype=torch.long)
        self._trie_items: list[str] = []
        self._trie_columns: dict[str, int] = {}
        self.blend: Blend | None = None  # served now: the adapter's own blend, or the base model's
        self.base_blend: Blend | None = None
        # Under `semantic`: the codebook, the codes of the model or adapter in service (extended here
        # only where `extends_items`), and this process's provisional codes for the items they lack.
        self.semantic: SemanticIds | None = None
        self.item_codes: dict[str, Code] = {}
        self._provisional_codes: dict[str, Code] = {}

    # ---------------------------------------------------------------- building and loading

    @classmethod
    def build_tiny(
        cls,
        catalog: Catalog,
        instructions: Instructions | None = None,
        *,
        corpus: Iterable[str] = (),
        config: TinyConfig = TinyConfig(),
        device: str = "auto",
        seed: int = 0,
        scheme: SchemeName = "item_token",
        dtype: str = "auto",
        train: bool = False,
        semantic: tuple[SemanticIds, Mapping[str, Code]] | None = None,
    ) -> Recommender:
        """A small T5 from a config with a tokenizer trained here on the catalog text (and `corpus`,
        e.g. rendered instructions); under the `item_token` scheme, one token per catalog item; under
        `semantic`, the code vocabulary of `semantic` (codebook, codes; None: fitted on the item text
        alone). `dtype` and `train`: as for `load`."""
        instructions = instructions or Instructions.load()
        texts = [f"{i.title} {i.category or ''} {i.description or ''}" for i in catalog]
        template_words = [t.text for ts in instructions.templates.values() for t in ts]
        if scheme == "semantic" and semantic is None:
            by_item = item_texts(catalog)
            semantic = fit_semantic_ids(catalog.ids, [code_source(by_item, i) for i in catalog.ids])
        added = [item_token(i) for i in catalog.ids] if scheme == "item_token" else []
        tokenizer = train_tokenizer(
            # string.printable: every separator or punctuation an edited template may use is a token.
            [*texts, *template_words, *corpus, "click purchase nothing yet unknown", string.printable],
            config.text_vocab,
            semantic[0].tokens if semantic is not None and scheme == "semantic" else added,
        )
        torch.manual_seed(seed)
        # Passed as a dict: transformers 5 types T5Config without these (they still work), and a
        # config built without decoder_start_token_id has no such attribute at all.
        t5_args: dict[str, Any] = {
            "vocab_size": len(tokenizer),
            "d_model": config.d_model,
            "d_kv": config.d_model // config.num_heads,
            "d_ff": config.d_ff,
            "num_layers": config.num_layers,
            "num_decoder_layers": config.num_decoder_layers,
            "num_heads": config.num_heads,
            "dropout_rate": config.dropout,
            "feed_forward_proj": "relu",
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }
        t5 = T5Config(**t5_args)
        rec = cls(
            T5ForConditionalGeneration(t5),
            tokenizer,
            scheme=scheme,
            instructions=instructions,
            device=resolve_device(device),
            base="tiny",
            max_input_tokens=config.max_input_tokens,
            dtype=dtype,
            train=train,
        )
        if scheme == "semantic" and semantic is not None:
            rec.semantic, rec.item_codes = semantic[0], dict(semantic[1])
        rec.set_catalog(catalog)
        return rec

    @classmethod
    def load(
        cls,
        path_or_id: str,
        device: str = "auto",
        *,
        scheme: SchemeName | None = None,
        instructions: Instructions | None = None,
        catalog: Catalog | None = None,
        task: str = DEFAULT_TASK,
        use_blend: bool = True,
        num_beams: int | None = None,
        batch_size: int = 64,
        dtype: str = "auto",
        train: bool = False,
        extend_items: bool = True,
        provisional_items: bool = False,
    ) -> Recommender:
        """A checkpoint by hub id or directory (safetensors weights only). A directory written by
        `save` brings its scheme, templates and catalog (`instructions` overrides its templates);
        a plain hub checkpoint uses the `title` scheme unless told otherwise; a `blend.npz` beside
        the weights is used when `use_blend`. `num_beams` and `batch_size` become the defaults of
        `recommend` and `item_log_probs`. An `adapter_config.json` in the directory is a LoRA
        increment: its base model is loaded first and the adapter put on top. `dtype`: what the
        model computes in (see `resolve_dtype`); the weights are cast to it, unless `train` (fp32
        weights, autocast on CUDA). `extend_items`: whether catalog items new to the model get a token
        here (see `extends_items`); an adapter's own mapping is applied before any; `provisional_items`:
        see the attribute. A checkpoint that cannot be had raises ModelError naming the fixes."""
        path = Path(path_or_id)
        if (path / "adapter_config.json").is_file():
            cfg = json.loads((path / "adapter_config.json").read_text())
            rec = cls.load(
                str(cfg["base_model_name_or_path"]),
                device,
                scheme=scheme,
                instructions=instructions,
                task=task,
                num_beams=num_beams,
                batch_size=batch_size,
                dtype=dtype,
                train=train,
                extend_items=False,
                provisional_items=provisional_items,
            )
            if catalog is not None:
                rec.set_catalog(catalog)
            own = Blend.load(str(path / BLEND)) if use_blend and (path / BLEND).is_file() else None
            rec.load_adapter(str(path), version=path.name, blend=own)
            rec.extends_items = extend_items
            return rec
        meta: dict[str, Any] = {}
        if (path / META_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text())
        if instructions is None:
            tpl = path / TEMPLATES_FILE
            instructions = Instructions.load(tpl if tpl.is_file() else None)
        try:
            model = T5ForConditionalGeneration.from_pretrained(path_or_id, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        except LOAD_ERRORS as exc:
            raise load_error(path_or_id, exc) from exc
        rec = cls(
            model,
            tokenizer,
            scheme=scheme or meta.get("scheme", "title"),
            instructions=instructions,
            device=resolve_device(device),
            base=meta.get("base", path_or_id),
            task=task,
            max_input_tokens=int(meta.get("max_input_tokens", 512)),
            num_beams=num_beams,
            batch_size=batch_size,
            dtype=dtype,
            train=train,
        )
        rec.extends_items = extend_items
        rec.provisional_items = provisional_items
        if rec.scheme == "semantic":
            rec._load_semantic(path, path_or_id, train)
        if catalog is None and (path / "catalog.jsonl").is_file():
            from streamrec.events import CatalogItem

            # Line by line, not the file's text split up front: at 10^6 items the lines' strings,
            # interleaved with the items kept, would pin hundreds of MB of freed memory.
            with (path / "catalog.jsonl").open(encoding="utf-8") as f:
                catalog = Catalog(CatalogItem.model_validate_json(line) for line in f if line.strip())
        if catalog is not None:
            rec.set_catalog(catalog)
        if use_blend and (path / BLEND).is_file():
            rec.set_blend(Blend.load(str(path / BLEND)))
        return rec

    def save(self, out_dir: str | Path) -> Path:
        """Write the model like a hub checkpoint (config, safetensors, tokenizer files) plus the
        scheme, the templates and the catalog, so `Recommender.load(out_dir)` restores all of it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {"scheme": self.scheme, "base": self.base, "max_input_tokens": self.max_input_tokens}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        self.save_item_tokens(out)
        if self.semantic is not None:
            self.semantic.save(str(out / CODEBOOK_FILE))
        src = self.instructions.source or DEFAULT_TEMPLATES
        if Path(src).resolve() != (out / TEMPLATES_FILE).resolve():
            shutil.copyfile(src, out / TEMPLATES_FILE)
        with (out / "catalog.jsonl").open("w", encoding="utf-8") as f:
            for item in self.catalog:
                f.write(item.model_dump_json() + "\n")
        if self.blend is not None:
            self.save_blend(out)
        return out

    def set_blend(self, blend: Blend | None) -> None:
        """Mix this item-kNN / Markov signal into the base model's item distribution (one-token
        schemes): served whenever the adapter in service brings no blend of its own."""
        with self._lock:
            self.blend = blend
            self.base_blend = blend

    def set_adapter_blend(self, blend: Blend | None) -> None:
        """Serve `blend` with the adapter in service (an increment refits it); None: the base model's."""
        with self._lock:
            self.blend = blend if blend is not None else self.base_blend

    def save_blend(self, out_dir: str | Path) -> None:
        if self.blend is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.blend.save(str(Path(out_dir) / BLEND))

    # ---------------------------------------------------------------- catalog

    def set_catalog(self, catalog: Catalog, *, extend: bool | None = None) -> None:
        """Use this catalog from the next batch on: rebuilds the trie over its available items. Under
        the `item_token` scheme, items new to the tokenizer get a token when this model
        `extends_items` and wears no adapter yet (peft's wrappers fix the vocabulary's size): the
        mapping grows, and each new row starts from the item's text (`_add_item_tokens`). Otherwise
        an id chosen here would be this process's own: with `provisional_items` the new items are
        served at once from provisional ids in the spare rows (until a model or adapter whose
        mapping names them is loaded), else they stay out of the trie. `extend` overrides
        `extends_items` for this call."""
        with self._lock:
            servable = catalog
            texts = item_texts(catalog)
            if self.scheme == "item_token":
                self._drop_provisional()
                known = self.item_tokens
                missing = sorted(i for i in catalog.ids if i not in known)
                extend = self.extends_items if extend is None else extend
                wrapped = hasattr(self.model, "peft_config")
                if self.provisional_items and not wrapped and self._rows() - len(self.tokenizer) < SPARE_ROWS:
                    # Headroom before an adapter fixes the size: items that come later are served too.
                    self._grow(len(self.tokenizer) + self._spare())
                if missing and extend and not wrapped:
                    # In id order, not the mirror's arrival order: two trainers extending one
                    # mapping with one catalog agree.
                    self._add_item_tokens([item_token(i) for i in missing], texts)
                elif missing:
                    room = self._rows() - len(self.tokenizer) if wrapped else len(missing)
                    take = missing[: max(0, room)] if self.provisional_items else []
                    if take:
                        self._official_tokenizer = copy.deepcopy(self.tokenizer)
                        self._add_item_tokens([item_token(i) for i in take], texts)
                        self._provisional = frozenset(take)
                    if len(take) < len(missing):
                        left = set(missing[len(take) :])
                        servable = Catalog(item for item in catalog if item.item_id not in left)
            elif self.scheme == "semantic":
                self._code_new_items(catalog, texts, self.extends_items if extend is None else extend)
            codes = {**self.item_codes, **self._provisional_codes}
            self.catalog = catalog
            self.names = identifiers(catalog, self.scheme, codes)
            self.texts = texts
            self.trie = build_trie(
                servable, self.scheme, self.encode_target, encode_many=self.encode_targets, codes=codes
            )
            # Built once per catalog, never per request: the item list, each item's column, and
            # under a one-token scheme the token ids (a device tensor) whose logits rank the items.
            self._trie_items = self.trie.items
            self._trie_columns = {item: n for n, item in enumerate(self._trie_items)}
            # When every identifier is one token followed by EOS, the first decoding step already
            # ranks whole items exactly, so `recommend` can read all scores from one step.
            eos = self.tokenizer.eos_token_id
            paths = [self.trie.path(i) for i in self._trie_items]
            single = all(len(p) == 2 and p[1] == eos for p in paths)
            self._single = {p[0]: i for p, i in zip(paths, self._trie_items, strict=True)} if single else {}
            self._single_items = list(self._single.values())
            self._single_tokens = torch.tensor(list(self._single), dtype=torch.long, device=self.device)

    # ---------------------------------------------------------------- semantic ids

    def _load_semantic(self, path: Path, path_or_id: str, train: bool) -> None:
        """A saved semantic model's codebook and codes. A checkpoint without them can only be
        trained (which fits them: `use_semantic`), never served."""
        if (path / CODEBOOK_FILE).is_file():
            self.semantic = SemanticIds.load(str(path / CODEBOOK_FILE))
            self.item_codes = read_codes(str(path / CODES_FILE)) if (path / CODES_FILE).is_file() else {}
            added = self.tokenizer.get_added_vocab()
            missing = [t for t in self.semantic.tokens if t not in added]
            if missing:
                raise ModelError(f"{path_or_id}: its tokenizer lacks {len(missing)} code token(s), e.g. {missing[:3]}")
        elif not train:
            raise ModelError(
                f"{path_or_id} has no {CODEBOOK_FILE}: the semantic scheme serves a model trained with it "
                "(streamrec train --scheme semantic)"
            )

    def use_semantic(self, semantic: SemanticIds, codes: Mapping[str, Code]) -> None:
        """Name items by `semantic`'s codes from now on: the code tokens join the vocabulary (rows
        spread like the vocabulary's, from noise of their own) and the trie is rebuilt.
        For a pretrained checkpoint about to be fine-tuned under `semantic`."""
        with self._lock:
            known = self.tokenizer.get_added_vocab()
            new = [t for t in semantic.tokens if t not in known]
            self._add_item_tokens(new)
            # Spread like the vocabulary's rows, not bunched at its mean: codes that start alike would
            # take many steps to tell apart.
            model = _base_t5(self.model)
            ids = self.tokenizer.convert_tokens_to_ids(new)
            heads = [model.get_output_embeddings()] if _own_head(model) else []
            with torch.no_grad():
                for m, module in enumerate([model.get_input_embeddings(), *heads]):
                    matrix = _base_weight(module)
                    vocab = matrix[: self.base_vocab].double()
                    noise = torch.stack([_token_noise(t, m, matrix.shape[1]) for t in new]).double()
                    rows = vocab.mean(dim=0) + vocab.std(dim=0) * noise
                    matrix[ids] = rows.to(matrix.dtype).to(matrix.device)
            self.semantic, self.item_codes = semantic, dict(codes)
            self.set_catalog(self.catalog)

    def _code_new_items(self, catalog: Catalog, texts: Mapping[str, tuple[str, str]], extend: bool) -> None:
        """Codes for catalog items that the codes in service lack, from their text: the codes
        themselves with `extend` (the trainer's), else provisional ones when `provisional_items`
        (given way to the next artifact's). The code vocabulary is fixed, so no row is ever added."""
        self._provisional_codes = {}
        if self.semantic is None:
            return
        missing = [i for i in catalog.ids if i not in self.item_codes]
        if not missing or not (extend or self.provisional_items):
            return
        new = self.semantic.assign(missing, [code_source(texts, i) for i in missing], self.item_codes)
        if extend:
            self.item_codes = {**self.item_codes, **new}
        else:
            self._provisional_codes = new

    @property
    def code_token_ids(self) -> list[int]:
        """Under `semantic`: the ids of the whole code vocabulary."""
        if self.semantic is None:
            return []
        ids: list[int] = self.tokenizer.convert_tokens_to_ids(self.semantic.tokens)
        return ids

    def _adapter_codes(self, adapter_dir: str) -> dict[str, Code] | None:
        """Under `semantic`: the codes in service extended by an adapter's (ModelError when they
        conflict); None for other schemes or an adapter without codes."""
        path = Path(adapter_dir) / CODES_FILE
        if self.scheme != "semantic" or not path.is_file():
            return None
        return merged_codes(self.item_codes, read_codes(str(path)), f"adapter {adapter_dir!r}")

    def _rows(self) -> int:
        """The embedding's rows: the tokenizer's ids plus any spare ones."""
        return int(_base_weight(_base_t5(self.model).get_input_embeddings()).shape[0])

    def _spare(self) -> int:
        return max(SPARE_ROWS, int(len(self.tokenizer) * SPARE_SHARE))

    def _grow(self, rows: int) -> None:
        """Resize the embedding (and a head of its own) to `rows`; the new rows are for the caller to set."""
        model = _base_t5(self.model)
        own_head = _own_head(model)
        kept = _base_weight(model.get_output_embeddings()).detach().clone() if own_head else None
        model.resize_token_embeddings(rows, mean_resizing=False)
        if kept is not None:
            # transformers 5 re-ties T5's head to the input embedding on a resize, whatever the
            # checkpoint had: Flan's trained output embedding would be silently replaced.
            _untie_output_head(model, kept, rows)

    def _drop_provisional(self) -> None:
        """Forget the provisional item tokens (their rows stay, to be written over)."""
        if self._official_tokenizer is not None:
            self.tokenizer = self._official_tokenizer
            self._official_tokenizer = None
            self._provisional = frozenset()

    def _add_item_tokens(self, tokens: Sequence[str], texts: Mapping[str, tuple[str, str]] | None = None) -> None:
        """Give each of `tokens` a tokenizer id and an embedding row, in the input embedding and, when
        the model has one of its own (T5 v1.1, Flan), in the output head too. A row starts from the
        item's text (`text_rows`; `texts`: item id -> (title, category)), so that an item new to
        the model is nameable before any training. The embedding keeps any rows beyond the
        tokenizer: Flan's 32,128 rows hold 28 unused ones past its 32,100 tokens, which the first new
        tokens take over (a resize down to len(tokenizer) would drop them and change the model's
        shape); an inference worker grows it with headroom (SPARE_ROWS), since once an adapter is on
        it peft's wrappers fix its size."""
        model = _base_t5(self.model)
        emb = model.get_input_embeddings()
        own_head = _own_head(model)
        known = len(self.tokenizer)
        # normalized=False: an item token is matched on the raw text, never normalised; lstrip: it
        # swallows the space before it, which would otherwise cost a lone "▁" token per history item.
        self.tokenizer.add_tokens([AddedToken(t, normalized=False, lstrip=True) for t in tokens])
        new = list(range(known, len(self.tokenizer)))
        if len(self.tokenizer) > self._rows():
            if hasattr(self.model, "peft_config"):
                raise ModelError(f"no spare embedding rows left for {len(new)} new item(s) under an adapter")
            self._grow(len(self.tokenizer) + (self._spare() if self.provisional_items else 0))
            emb = model.get_input_embeddings()
        matrices = [_base_weight(emb)] + ([_base_weight(model.get_output_embeddings())] if own_head else [])
        texts = texts or {}
        title_ids = self._text_ids([item_of_token(t) or t for t in tokens], texts)
        # The model's own item rows (the base checkpoint's, the same in every process) teach how an
        # item's text maps to its row.
        base_items = {i: t for i, t in self.item_tokens.items() if t < min(known, self.base_vocab) and i in texts}
        fit_items = sorted(base_items)
        fit_ids = self._text_ids(fit_items, texts)
        with torch.no_grad():
            for m, matrix in enumerate(matrices):
                text = matrix[:known].double()
                # Noise drawn from the token itself, not the process's random state: every process
                # that gives one item a row gives it the same row.
                noise = torch.stack([_token_noise(t, m, matrix.shape[1]) for t in tokens]).double()
                fit = (
                    (_mean_rows(text, fit_ids, self.base_vocab), text[[base_items[i] for i in fit_items]])
                    if fit_items
                    else None
                )
                rows = text_rows(text, _mean_rows(text, title_ids, self.base_vocab), fit)
                spread = text.std(dim=0, keepdim=True) * 0.1
                matrix[new] = (rows + spread * noise).to(matrix.dtype).to(matrix.device)

    def _text_ids(self, items: Sequence[str], texts: Mapping[str, tuple[str, str]]) -> list[list[int]]:
        """Each item's title and category as token ids (none for an item without text)."""
        words = [" ".join(x for x in texts.get(i, ("", "")) if x) for i in items]
        if not any(words):
            return [[] for _ in items]
        ids: list[list[int]] = self.tokenizer(words, add_special_tokens=False).input_ids
        return ids

    # ---------------------------------------------------------------- the item mapping

    @property
    def item_tokens(self) -> dict[str, int]:
        """Under `item_token`: each item that has a token, with its id (the tokenizer is the mapping)."""
        if self.scheme != "item_token":
            return {}
        out: dict[str, int] = {}
        for token, token_id in self.tokenizer.get_added_vocab().items():
            if (item := item_of_token(token)) is not None and item not in self._provisional:
                out[item] = int(token_id)
        return out

    def save_item_tokens(self, out_dir: str | Path) -> None:
        """Write the item mapping beside a model or adapter: item -> token id under `item_token`,
        item -> code under `semantic` (the provisional ones never)."""
        if self.scheme == "item_token":
            mapping = dict(sorted(self.item_tokens.items(), key=lambda kv: kv[1]))
            (Path(out_dir) / ITEM_TOKENS_FILE).write_text(json.dumps(mapping, indent=0))
        elif self.scheme == "semantic":
            write_codes(str(Path(out_dir) / CODES_FILE), self.item_codes)

    def _adapter_item_tokens(self, adapter_dir: str) -> list[str] | None:
        """The items an adapter's mapping brings (to add, in id order), once it is known to extend
        the mapping in service; None when nothing is to add. Raises ModelError, changing nothing,
        when the mapping conflicts or is missing from an adapter that carries item rows."""
        if self.scheme != "item_token":
            return None
        path = Path(adapter_dir) / ITEM_TOKENS_FILE
        if not path.is_file():
            # Made before adapters carried their mapping: its item rows are placed right only when
            # they are all the base checkpoint's own tokens.
            cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
            rows = cfg.get("trainable_token_indices") or []
            ids = [int(t) for ts in rows.values() for t in ts] if isinstance(rows, dict) else [int(t) for t in rows]
            if any(t >= self.base_vocab for t in ids):
                raise ModelError(
                    f"adapter {adapter_dir!r} trains rows of items new to the base model but has no "
                    f"{ITEM_TOKENS_FILE}: which item each row belongs to is unknown. Train and register it again"
                )
            return None
        try:
            wanted = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"adapter {adapter_dir!r}: unreadable {ITEM_TOKENS_FILE}: {exc}") from exc
        add = item_tokens_to_add(self.item_tokens, len(self.tokenizer), wanted, f"adapter {adapter_dir!r}")
        return add or None

    def _apply_item_tokens(self, items: Sequence[str]) -> Any:
        """Give `items` their tokens (the next ids); returns what `_undo_item_tokens` puts back: the
        tokenizer, the embedding modules and their weights (a resize replaces them, and re-ties the
        head; spare rows are overwritten in place), the config's vocabulary size and the tied keys."""
        t5 = _base_t5(self.model)
        modules = [
            (name, m, m.weight, m.weight.detach().clone())
            for name, m in t5.named_modules(remove_duplicate=False)
            if isinstance(m, torch.nn.Embedding) or m is t5.get_output_embeddings()
        ]
        tied = copy.copy(t5.__dict__.get("all_tied_weights_keys"))
        saved = (copy.deepcopy(self.tokenizer), modules, t5.config.vocab_size, tied)
        self._add_item_tokens([item_token(i) for i in items], self.texts)
        return saved

    def _undo_item_tokens(self, saved: Any) -> None:
        tokenizer, modules, vocab_size, tied = saved
        t5 = _base_t5(self.model)
        with torch.no_grad():
            for name, module, weight, rows in modules:
                parent, _, attr = name.rpartition(".")
                setattr(t5.get_submodule(parent), attr, module)
                module.weight = weight
                weight.data = rows  # a resize may have swapped the parameter's data in place
        t5.config.vocab_size = vocab_size
        if tied is not None:
            t5.all_tied_weights_keys = tied
        self.tokenizer = tokenizer

    @property
    def start_token_id(self) -> int:
        """The decoder's first input. transformers 5 may keep it only in the generation config."""
        for cfg in (self.model.config, getattr(self.model, "generation_config", None)):
            value = getattr(cfg, "decoder_start_token_id", None) if cfg is not None else None
            if value is not None:
                return int(value)
        return int(self.tokenizer.pad_token_id or 0)

    def encode_target(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text).input_ids
        return ids

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_target` of many texts in one batched tokenizer call (the trie's 10^6 identifiers)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer itself: transformers' wrapper converts each encoding in Python,
            # which was most of a 10^6-item catalog's trie build. The wrapper leaves the last call's
            # truncation and padding on it (and sets them again on each call): off, as for one text.
            backend.no_truncation()
            backend.no_padding()
            return [e.ids for e in backend.encode_batch(list(texts))]
        ids: list[list[int]] = self.tokenizer(list(texts)).input_ids
        return ids

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, adapter_dir: str, version: str | None = None, blend: Blend | None = None) -> None:
        """Put a LoRA adapter (peft directory) on the base model, replacing the current one, with the
        blend refitted with it (None: the base model's). The swap waits for a running batch to
        finish and the next batch waits for the swap, so no batch ever mixes two adapters; the pause
        is the time to read the (small) adapter weights. A failed load raises ModelError and leaves
        the model exactly as it was: peft injects an adapter's layers before it reads its weights,
        so whatever it injected is taken out again. Under `item_token` the adapter's item mapping
        (ITEM_TOKENS_FILE) is served, never this process's: its new items get the ids it names (taking
        over from any provisional ids), and one that moves an item in service or is missing is refused."""
        name = version or Path(adapter_dir).name
        with self._lock:
            self._drop_provisional()
            codes_before = self.item_codes
            try:
                add = self._adapter_item_tokens(adapter_dir)
                codes = self._adapter_codes(adapter_dir)
                if (
                    add is not None
                    and hasattr(self.model, "peft_config")
                    and len(self.tokenizer) + len(add) > self._rows()
                ):
                    # peft's wrappers hold the embedding: its size is fixed until the process restarts.
                    raise ModelError(
                        f"cannot load adapter {adapter_dir!r}: it brings {len(add)} item(s) new to this worker (e.g. "
                        f"{add[:3]}), more than the spare rows left under the adapter in service; restart the worker"
                    )
                saved = self._apply_item_tokens(add) if add is not None else None
                if codes is not None:
                    self.item_codes = codes
                try:
                    self._load_adapter(adapter_dir, name, blend)
                except ModelError:
                    if saved is not None:
                        self._undo_item_tokens(saved)
                    self.item_codes = codes_before
                    raise
            finally:
                # The items it brought are recommendable now; the rest of the new ones provisionally again.
                self.set_catalog(self.catalog, extend=False)

    def _load_adapter(self, adapter_dir: str, name: str, blend: Blend | None) -> None:
        from peft import PeftModel

        with self._lock, _peft_keeps_own_head(self.model):
            model = self.model
            wrapped = _peft_wrappers(model)
            trainable = {n: p.requires_grad for n, p in model.named_parameters()}
            had_config = hasattr(model, "peft_config")
            try:
                if isinstance(model, PeftModel):
                    # A fresh peft name, never the active one's: loading into an existing name would
                    # overwrite the adapter in service before its weights are known to load.
                    safe, n = name.replace(".", "_"), 1  # peft adapter names become attribute names
                    while safe in model.peft_config:
                        safe, n = f"{name.replace('.', '_')}_{n}", n + 1
                    try:
                        model.load_adapter(adapter_dir, adapter_name=safe)
                    except BaseException:
                        if safe in model.peft_config:
                            model.delete_adapter(safe)
                        raise
                    old = model.active_adapter
                    model.set_adapter(safe)
                    model.delete_adapter(old)
                else:
                    self.model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=name.replace(".", "_"))
            except Exception as exc:
                # Layers injected into modules the active adapter does not use, the base model's own
                # peft_config, and the trainable flags peft moved: all back as they were.
                _strip_peft_wrappers(model.base_model.model if isinstance(model, PeftModel) else model, wrapped)
                if not had_config and hasattr(model, "peft_config") and not isinstance(model, PeftModel):
                    del model.peft_config
                for n, p in model.named_parameters():
                    p.requires_grad_(trainable.get(n, False))
                self.model = model
                # RuntimeError: weights whose shapes do not fit this model (another base or vocabulary).
                raise ModelError(f"cannot load adapter {adapter_dir!r}: {exc}") from exc
            self.model.to(self.device).eval()
            self.adapter_version = name
            self.set_adapter_blend(blend)

    @property
    def version(self) -> ModelVersion:
        return ModelVersion(base=self.base, adapter=self.adapter_version)

    # ---------------------------------------------------------------- inference

    def instruction(self, request: RecRequest) -> str:
        return self.instructions.serve(request.history, request.task or self.task, self.names, self.texts)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_input_tokens, return_tensors="pt"
        )
        return {"input_ids": enc.input_ids.to(self.device), "attention_mask": enc.attention_mask.to(self.device)}

    @torch.inference_mode()
    def item_log_probs(self, requests: Sequence[RecRequest], batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Under a one-token-per-item scheme: log P(item | instruction) for every available item, in
        the order of `catalog.available_ids`, one row per request (for ranking and blending), at
        most `batch_size` requests (default: the model's) per forward pass."""
        with self._lock:
            rows = [logp.cpu().numpy() for _, logp in self._item_log_prob_batches(requests, batch_size)]
            return np.concatenate(rows) if rows else np.zeros((0, len(self._single_tokens)), dtype=np.float32)

    def _item_log_prob_batches(
        self, requests: Sequence[RecRequest], batch_size: int | None
    ) -> Iterator[tuple[Sequence[RecRequest], torch.Tensor]]:
        """`item_log_probs` one batch at a time, as (requests, a tensor of rows on the device)."""
        batch_size = batch_size or self.batch_size
        if not self._single:
            raise ModelError("item_log_probs needs a scheme with one token per item (item_token)")
        tokens = self._single_tokens
        start = torch.full((1, 1), self.start_token_id, device=self.device)
        for b in range(0, len(requests), batch_size):
            chunk = requests[b : b + batch_size]
            enc = self._tokenize([self.instruction(r) for r in chunk])
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(**enc, decoder_input_ids=start.expand(len(chunk), 1)).logits[:, 0, :]
                # Normalised over the items: the blend reads these as P(item), and the item loss
                # never trains the text tokens' logits down.
                logp = torch.log_softmax(logits[:, tokens].float(), dim=-1)
            yield chunk, logp

    @property
    def item_token_ids(self) -> list[int]:
        """Under a one-token-per-item scheme, each item's token, in `single_token_items` order."""
        return list(self._single)

    @property
    def single_token_items(self) -> list[str]:
        """The items `item_log_probs` scores, column by column (one shared list: do not modify)."""
        return self._single_items

    def recommend(
        self,
        requests: Sequence[RecRequest],
        k: int = 10,
        *,
        num_beams: int | None = None,
        batch_size: int | None = None,
        blend: bool | None = None,
    ) -> list[list[ScoredItem]]:
        """Ranked lists (best first, unique, available, never an excluded item) for many users at
        once, `batch_size` users per forward pass and `num_beams` beams under a multi-token scheme
        (defaults: the model's). Score: the identifier's log-probability under the model (divided by
        its length ** `length_penalty` under a multi-token scheme), or under the blended mixture when
        a blend is set (`blend=False` asks for the model alone)."""
        batch_size = batch_size or self.batch_size
        beams = num_beams or self.num_beams or max(k, 4)
        with self._lock:
            if len(self.trie) == 0:
                raise ModelError("no catalog: call set_catalog first")
            use = self.blend if blend is not False else None
            if self._single:
                return self._recommend_single(requests, k, batch_size, use)
            out: list[list[ScoredItem]] = []
            for b in range(0, len(requests), batch_size):
                chunk = requests[b : b + batch_size]
                found = self._beam_search(chunk, k, beams)
                if use is None:
                    out.extend(self._ranked(f, k) for f in found)
                else:
                    out.extend(self._blended(chunk, found, k, use))
            return out

    def _recommend_single(
        self, requests: Sequence[RecRequest], k: int, batch_size: int, blend: Blend | None
    ) -> list[list[ScoredItem]]:
        """The one-step ranking, read from a few columns per user: the model's top k plus as many
        as the user excludes, and the columns the blend's signals score. Every other item scores
        the model's share of its probability alone, below those top ones: the list is the one a
        ranking of every column gives, without a pass over 10^6 columns per user on the host."""
        items = self.single_token_items
        col = self._trie_columns  # the trie's order is the single-token items' order
        out = []
        for chunk, logp in self._item_log_prob_batches(requests, batch_size):
            banned = [[col[i] for i in req.exclude if i in col] for req in chunk]
            want = min(logp.shape[1], k + max((len(b) for b in banned), default=0))
            tops = torch.topk(logp, want, dim=1).indices.cpu().numpy()
            for r, req in enumerate(chunk):
                signals = blend.sparse_signals([h.item_id for h in req.history], items) if blend is not None else None
                extra = [signals[0][0], signals[1][0]] if signals is not None else []
                at = np.unique(np.concatenate([tops[r].astype(np.int64), *extra]))  # sorted columns
                row = logp[r, torch.from_numpy(at).to(logp.device)].cpu().numpy().astype(np.float64)
                if blend is not None and signals is not None:
                    row = blend.log_probs_at(np.exp(row), at, signals)
                top = top_k(row, np.flatnonzero(np.isin(at, banned[r])).tolist(), k)
                out.append([ScoredItem(items[at[n]], float(row[n])) for n in top])
        return out

    def _ranked(self, found: dict[str, float], k: int) -> list[ScoredItem]:
        """The k best of a beam search's finished items, by log-probability over length ** penalty."""
        alpha = self.length_penalty
        scored = found if alpha == 0 else {i: s / len(self.trie.path(i)) ** alpha for i, s in found.items()}
        return [ScoredItem(i, s) for i, s in sorted(scored.items(), key=lambda kv: -kv[1])[:k]]

    # Candidates each classic signal adds to the beam's items when blending a multi-token scheme.
    BLEND_CANDIDATES = 20

    def _candidates(
        self, requests: Sequence[RecRequest], found: Sequence[dict[str, float]], blend: Blend
    ) -> list[tuple[list[int], npt.NDArray[np.float64], npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """Per request under a multi-token scheme: the candidates (columns of `trie_items`) the blend
        ranks, the beam's items plus each classic signal's top items, with the model's log-probability
        of each (those the beam did not reach scored by teacher forcing, in one batched pass) and the
        signals (P_knn, P_markov) at each candidate. The model's scores are already a distribution
        over the items (see `_beam_search`), so they mix as they are. The signals are read sparse:
        nothing here is per catalog item."""
        items = self.trie_items
        col = self._trie_columns
        cands: list[list[str]] = []
        signals = []
        for req, beam in zip(requests, found, strict=True):
            knn, markov = blend.sparse_signals([h.item_id for h in req.history], items)
            banned = {col[i] for i in req.exclude if i in col}
            top = self.BLEND_CANDIDATES
            extra = [items[c] for cols, p in (knn, markov) for c in _best_columns(cols, p, banned, top)]
            cands.append(list(dict.fromkeys([*beam, *extra])))
            signals.append((knn, markov))
        missing = [[i for i in c if i not in beam] for c, beam in zip(cands, found, strict=True)]
        scored = self.sequence_log_probs(requests, missing)
        out = []
        for cand, beam, miss, extra_lp, (knn, markov) in zip(cands, found, missing, scored, signals, strict=True):
            lp = dict(beam)
            lp.update(zip(miss, extra_lp.tolist(), strict=True))
            at = np.array([col[i] for i in cand], dtype=np.int64)
            logp = np.array([lp[i] for i in cand], dtype=np.float64)
            out.append((at.tolist(), logp, _values_at(*knn, at), _values_at(*markov, at)))
        return out

    def _blended(
        self, requests: Sequence[RecRequest], found: Sequence[dict[str, float]], k: int, blend: Blend
    ) -> list[list[ScoredItem]]:
        """The blend under a multi-token scheme, over `_candidates`."""
        items = self.trie_items
        out = []
        for at, logp, p_knn, p_markov in self._candidates(requests, found, blend):
            row = np.log(blend.mix(np.exp(logp), p_knn, p_markov) + 1e-30)
            top = top_k(row, [], k)
            out.append([ScoredItem(items[at[n]], float(row[n])) for n in top])
        return out

    def item_probs(self, requests: Sequence[RecRequest], blend: Blend) -> npt.NDArray[np.float32]:
        """P(item | instruction) under the model alone, one row per request and a column per
        `trie_items` item: for choosing `blend`'s weights. Under a multi-token scheme only the items
        the blend would rank are scored (the beam's and the signals' top items), the others 0."""
        with self._lock:
            if self._single:
                return np.exp(self.item_log_probs(requests))
            out = np.zeros((len(requests), len(self.trie)), dtype=np.float32)
            for b in range(0, len(requests), self.batch_size):
                chunk = requests[b : b + self.batch_size]
                found = self._beam_search(chunk, 10, self.num_beams or 10)
                for r, (at, logp, _, _) in enumerate(self._candidates(chunk, found, blend)):
                    out[b + r, at] = np.exp(logp)
            return out

    # ---------------------------------------------------------------- multi-token decoding
    # An identifier's score is log P(identifier | the output is a catalog item): at each token the
    # model's next-token distribution renormalised over the tokens the trie allows there, the
    # multi-token form of what `item_log_probs` is under one-token schemes (normalised over the
    # items). A node with one child costs nothing, and once one item is left below a prefix its
    # remaining tokens are certain: the search finishes it there. Both cut most decoder steps, and
    # only the allowed tokens' logits are computed.

    def _t5(self) -> Any:
        """The T5 itself, under any peft wrapper (its LoRA layers are inside it)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _encode(self, requests: Sequence[RecRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tokenize([self.instruction(r) for r in requests])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            states = self._t5().get_encoder()(**enc).last_hidden_state
        return states, enc["attention_mask"]

    def _decode(
        self, tokens: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, cache: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """The decoder's last hidden states (scaled as the LM head reads them) and the cache."""
        t5 = self._t5()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = t5.get_decoder()(
                input_ids=tokens,
                encoder_hidden_states=states,
                encoder_attention_mask=mask,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        hidden = out.last_hidden_state.float()
        if getattr(t5.config, "scale_decoder_outputs", t5.config.tie_word_embeddings):
            hidden = hidden * (t5.config.d_model**-0.5)
        return hidden, out.past_key_values

    def _logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of `tokens` only (columns, in order) for each row of `hidden`, in fp32."""
        head = self._t5().get_output_embeddings()
        if type(head) is torch.nn.Linear and head.bias is None:
            return hidden @ head.weight[tokens].float().T
        picked: torch.Tensor = head(hidden.to(head.weight.dtype)).float()[..., tokens]  # a wrapped head
        return picked

    @torch.inference_mode()
    def _beam_search(self, requests: Sequence[RecRequest], k: int, num_beams: int) -> list[dict[str, float]]:
        """Beam search over the trie through the decoder's KV cache: each step feeds every live beam's
        last token only, scores the tokens the trie allows after it (minus branches holding nothing
        but excluded items), and keeps each request's `num_beams` best unfinished prefixes. Returns
        each request's finished items with their log-probabilities. Without a length penalty it
        stops once no live beam can beat the k-th finished score."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        trie = self.trie
        encoder_out, enc_mask = self._encode(requests)
        excluded = [trie.excluded_counts(r.exclude) for r in requests]
        done: list[dict[str, float]] = [{} for _ in requests]
        # The live beams, flat and grouped by request: request, trie node, summed log-probability.
        beam_req = list(range(len(requests)))
        beam_node = [trie.root] * len(requests)
        beam_score = np.zeros(len(requests))
        rows = torch.arange(len(requests), device=self.device)  # each beam's encoder row
        tokens = torch.full((len(requests), 1), self.start_token_id, dtype=torch.long, device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        prune = self.length_penalty == 0
        dropped: list[list[tuple[float, TrieNode]]] = [[] for _ in requests]  # prefixes the beams let go
        for depth in range(trie.max_len):
            # From the second step on the cross-attention keys and values come from the cache, so the
            # encoder states only lend their shape: a broadcast view instead of a copy per beam.
            states = encoder_out[rows] if depth == 0 else encoder_out[:1].expand(len(beam_req), -1, -1)
            hidden, cache = self._decode(tokens, states, enc_mask[rows], cache)
            logp = self._branch_log_probs(hidden[:, -1], beam_node)
            parent: list[int] = []
            token: list[int] = []
            child: list[TrieNode] = []
            for b, node in enumerate(beam_node):
                for t, c in trie.next_tokens(node, excluded[beam_req[b]]):
                    parent.append(b)
                    token.append(t)
                    child.append(c)
            if not parent:
                break
            score = np.array([logp[b].get(t, 0.0) for b, t in zip(parent, token, strict=True)]) + beam_score[parent]
            nxt: list[int] = []  # candidates kept as live beams, grouped by request
            for r, group in groupby(range(len(parent)), key=lambda n: beam_req[parent[n]]):
                live = []
                for n in group:
                    item = child[n].item_id or trie.sole_item(child[n])
                    if item is None:
                        live.append(n)
                    elif item not in done[r]:
                        done[r][item] = float(score[n])
                ranked = sorted(live, key=lambda n: -score[n])
                order = ranked[:num_beams]
                dropped[r].extend((float(score[n]), child[n]) for n in ranked[num_beams:])
                if prune and len(done[r]) >= k:
                    # Log-probabilities only fall as a sequence grows: a live beam below the k-th
                    # finished score can never enter the list.
                    kth = sorted(done[r].values(), reverse=True)[k - 1]
                    order = [n for n in order if score[n] > kth]
                nxt.extend(order)
            if not nxt:
                break
            keep = torch.tensor([parent[n] for n in nxt], device=self.device)
            cache.reorder_cache(keep)
            rows = rows[keep]
            tokens = torch.tensor([[token[n]] for n in nxt], dtype=torch.long, device=self.device)
            beam_req = [beam_req[parent[n]] for n in nxt]
            beam_node = [child[n] for n in nxt]
            beam_score = score[nxt]
        if prune and self.exact_search:
            self._complete(requests, k, done, dropped, excluded)
        return done

    def _complete(
        self,
        requests: Sequence[RecRequest],
        k: int,
        done: list[dict[str, float]],
        dropped: Sequence[Sequence[tuple[float, TrieNode]]],
        excluded: Sequence[Mapping[int, int]],
    ) -> None:
        """Make the beam's top k exact: a prefix's score bounds every item below it, so the items
        below a prefix the beams let go that still scores above the k-th finished item are scored
        by teacher forcing. A trained model rarely leaves any; a flat one (untrained) leaves most of
        the catalog, which then costs a teacher-forced pass over it."""
        todo: list[list[str]] = []
        for r, found in enumerate(done):
            kth = sorted(found.values(), reverse=True)[k - 1] if len(found) >= k else -math.inf
            below = [i for s, node in dropped[r] if s > kth for i in self.trie.items_below(node, excluded[r])]
            todo.append([i for i in dict.fromkeys(below) if i not in found])
        if any(todo):
            for found, items, scores in zip(done, todo, self.sequence_log_probs(requests, todo), strict=True):
                found.update(zip(items, scores.tolist(), strict=True))

    def _branch_log_probs(self, hidden: torch.Tensor, nodes: Sequence[TrieNode]) -> list[dict[int, float]]:
        """For each row's trie node, the log-probability of each of its children's tokens, the
        model's logits renormalised over those children; a node with one child needs no logits."""
        out: list[dict[int, float]] = [{} for _ in nodes]
        branch = [n for n, node in enumerate(nodes) if len(node.children) > 1]
        if not branch:
            return out
        kids = [list(nodes[n].children) for n in branch]
        union = sorted({t for ks in kids for t in ks})
        col = {t: c for c, t in enumerate(union)}
        width = max(len(ks) for ks in kids)
        index = torch.zeros((len(branch), width), dtype=torch.long)
        valid = torch.zeros((len(branch), width), dtype=torch.bool)
        for m, ks in enumerate(kids):
            index[m, : len(ks)] = torch.tensor([col[t] for t in ks])
            valid[m, : len(ks)] = True
        rows = torch.tensor(branch, device=self.device)
        logits = self._logits(hidden[rows], torch.tensor(union, device=self.device))
        picked = logits.gather(1, index.to(self.device)).masked_fill(~valid.to(self.device), -torch.inf)
        values = torch.log_softmax(picked, dim=-1).cpu().numpy()
        for m, (n, ks) in enumerate(zip(branch, kids, strict=True)):
            out[n] = dict(zip(ks, values[m, : len(ks)].tolist(), strict=True))
        return out

    def exhaustive(self, requests: Sequence[RecRequest], k: int) -> list[list[str]]:
        """The top k of every allowed item's whole identifier scored by teacher forcing, ranked as
        `recommend` ranks (length penalty included): what the beam search is checked against."""
        cands = [[i for i in self.trie_items if i not in r.exclude] for r in requests]
        scored = self.sequence_log_probs(requests, cands)
        return [
            [s.item_id for s in self._ranked(dict(zip(c, lp.tolist(), strict=True)), k)]
            for c, lp in zip(cands, scored, strict=True)
        ]

    @torch.inference_mode()
    def sequence_log_probs(
        self, requests: Sequence[RecRequest], items: Sequence[Sequence[str]], batch_size: int | None = None
    ) -> list[npt.NDArray[np.float64]]:
        """The score `_beam_search` gives each request's `items` (trie items), by teacher forcing:
        every item's whole token sequence scored in batched decoder passes. What an exhaustive
        search ranks by, and what the blend scores the candidates the beam did not reach with."""
        batch_size = batch_size or self.batch_size
        out: list[npt.NDArray[np.float64]] = []
        trie = self.trie
        with self._lock:
            for b in range(0, len(requests), batch_size):
                chunk, chunk_items = requests[b : b + batch_size], items[b : b + batch_size]
                pairs = [(r, i) for r, its in enumerate(chunk_items) for i in its]
                scores = np.zeros(len(pairs))
                if pairs:
                    encoder_out, enc_mask = self._encode(chunk)
                    # A pair's tokens up to where its item is the only one left: the rest are certain.
                    paths = []
                    for _, item in pairs:
                        nodes = trie.nodes(item)
                        cut = next((n for n, node in enumerate(nodes) if node.count == 1), len(nodes))
                        paths.append((trie.path(item)[:cut], nodes[:cut]))
                    per = 256
                    for p0 in range(0, len(pairs), per):
                        part = range(p0, min(p0 + per, len(pairs)))
                        width = max(1, max(len(paths[p][0]) for p in part))
                        rows = torch.tensor([pairs[p][0] for p in part], device=self.device)
                        dec = torch.full((len(part), width), self.start_token_id, dtype=torch.long)
                        for m, p in enumerate(part):
                            seq = paths[p][0]
                            if len(seq) > 1:
                                dec[m, 1 : len(seq)] = torch.tensor(seq[:-1])
                        hidden, _ = self._decode(dec.to(self.device), encoder_out[rows], enc_mask[rows])
                        flat = [(m, t) for m, p in enumerate(part) for t in range(len(paths[p][0]))]
                        if not flat:
                            continue
                        where = torch.tensor(flat)
                        nodes = [paths[p0 + m][1][t] for m, t in flat]
                        logp = self._branch_log_probs(hidden[where[:, 0], where[:, 1]], nodes)
                        for (m, t), lp in zip(flat, logp, strict=True):
                            scores[p0 + m] += lp.get(paths[p0 + m][0][t], 0.0)
                at = 0
                for its in chunk_items:
                    out.append(scores[at : at + len(its)])
                    at += len(its)
        return out

    # ---------------------------------------------------------------- training helpers

    @property
    def trie_items(self) -> list[str]:
        """The items generation can produce (available catalog items; one shared list: do not modify)."""
        return self._trie_items

    def target_ids(self, item_ids: Sequence[str]) -> list[list[int]]:
        return [list(self.trie.path(i)) if i in self.trie else self.encode_target(self.names[i]) for i in item_ids]

    # ---------------------------------------------------------------- training primitives
    # The loop itself lives in training.py; these are the few steps that need torch.

    def add_lora(self, r: int, alpha: int, dropout: float, *, train_items: bool = False) -> None:
        """Wrap the model in a fresh LoRA adapter (on the attention's q and v): only it trains. With
        `train_items` the item tokens' (under `semantic`, the code tokens') embedding rows train too, and
        are saved in the adapter: attention alone cannot make the model name an item whose
        embedding never learned anything (an item new since the bootstrap)."""
        from peft import LoraConfig, TaskType, get_peft_model

        if train_items and self._single:
            tokens: list[int] | None = sorted(self.item_token_ids)
        elif train_items and self.scheme == "semantic":
            tokens = sorted(self.code_token_ids)
        else:
            tokens = None
        indices: list[int] | dict[str, list[int]] | None = tokens
        if tokens is not None and _own_head(self.model):
            # A head of its own (T5 v1.1, Flan): the item tokens' output rows train too, apart from
            # their input rows; with a list, peft would train (and tie the head to) the input rows only.
            indices = {name: tokens for name in _embedding_names(self.model)}
        cfg = LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=["q", "v"],
            trainable_token_indices=indices,
        )
        with self._lock, _peft_keeps_own_head(self.model):
            self.model = get_peft_model(self.model, cfg)

    def continue_adapter(
        self, adapter_dir: str, version: str | None = None, blend: Blend | None = None, *, extend: bool = False
    ) -> None:
        """Put a saved adapter on the base model with its weights trainable, with its blend (None:
        the base model's): the next increment starts from the adapter in service, not from nothing.
        With `extend` (the trainer), catalog items that neither the base model nor the adapter names
        get the next ids, after the adapter's own, and rows that start from their text; when the
        adapter trains item rows, it is grown to train theirs too, so every item that has appeared
        since the bootstrap keeps learning."""
        from peft import PeftModel

        with self._lock:
            self._drop_provisional()
            if (add := self._adapter_item_tokens(adapter_dir)) is not None:
                # Its mapping before any id of this process's: the adapter's item rows are its items'.
                self._apply_item_tokens(add)
            if (codes := self._adapter_codes(adapter_dir)) is not None:
                self.item_codes = codes
            missing = sorted(i for i in self.catalog.ids if i not in self.item_tokens) if extend else []
            if missing and self.scheme == "item_token":
                first = len(self.tokenizer)
                self._add_item_tokens([item_token(i) for i in missing], self.texts)
                new_ids = list(range(first, len(self.tokenizer)))
            else:
                new_ids = []
            # Item rows would not fit the adapter's; codes need none, so the trainer codes new items here.
            self.set_catalog(self.catalog, extend=extend and self.scheme == "semantic")
        try:
            with tempfile.TemporaryDirectory(prefix="streamrec-grown-") as grown:
                source = _grown_adapter(adapter_dir, grown, self.model, new_ids) if new_ids else adapter_dir
                with self._lock, _peft_keeps_own_head(self.model):
                    self.model = PeftModel.from_pretrained(self.model, source, is_trainable=True)
                    self.model.to(self.device)
                    self.adapter_version = version or Path(adapter_dir).name
                    self.set_adapter_blend(blend)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"cannot load adapter {adapter_dir!r} for training: {exc}") from exc

    def save_adapter(self, out_dir: str | Path) -> None:
        """Write only the LoRA weights (adapter_config.json + adapter_model.safetensors) and the item
        mapping they were trained with (ITEM_TOKENS_FILE under `item_token`, CODES_FILE under `semantic`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Never the whole embedding, which peft would save once the vocabulary has grown: each worker
        # rebuilds the rows of the items the mapping brings from their text, and the adapter's
        # trained item rows travel as its trainable tokens.
        self.model.save_pretrained(out, save_embedding_layers=False)
        self.save_item_tokens(out)
        self.adapter_version = out.name

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def d_model(self) -> int:
        return int(self.model.config.d_model)

    def set_item_embeddings(self, item_ids: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        """Overwrite the token embeddings of one-token items (rows of `vectors`, unit variance),
        scaled to the spread of the existing embeddings."""
        rows = [self.trie.path(i)[0] for i in item_ids]
        with torch.no_grad():
            emb = self.model.get_input_embeddings().weight
            emb[rows] = torch.from_numpy(vectors).to(emb.dtype).to(emb.device) * emb.std()

    def tokenize_inputs(self, texts: Sequence[str]) -> list[list[int]]:
        ids: list[list[int]] = self.tokenizer(list(texts), truncation=True, max_length=self.max_input_tokens).input_ids
        return ids

    def snapshot(self) -> dict[str, Any]:
        """A copy of the trainable state (on the CPU), to keep the best epoch."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


def _best_columns(cols: npt.NDArray[np.int64], p: npt.NDArray[np.float32], banned: set[int], k: int) -> list[int]:
    """The `k` columns of a sparse signal with the largest positive values, best first (ties: the
    lower column), never a `banned` one."""
    ok = np.array([c not in banned for c in cols.tolist()], dtype=bool) & (p > 0)
    cols, p = cols[ok], p[ok]
    order = np.lexsort((cols, -p))[:k]
    return [int(c) for c in cols[order]]


def _values_at(
    cols: npt.NDArray[np.int64], p: npt.NDArray[np.float32], at: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """A sparse signal's values at columns `at` (0 where it has none)."""
    out = np.zeros(len(at), dtype=np.float32)
    if len(cols):
        order = np.argsort(cols)
        where = np.minimum(np.searchsorted(cols[order], at), len(cols) - 1)
        hit = cols[order][where] == at
        out[hit] = p[order][where[hit]]
    return out


# Fewer of the model's own items with text than this: new rows start from their text's token rows.
MIN_TEXT_FIT = 16


def _mean_rows(matrix: torch.Tensor, ids: Sequence[Sequence[int]], limit: int) -> torch.Tensor:
    """Each id list's mean row of `matrix` over its ids below `limit` (the text vocabulary); NaN
    for a list with none."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(len(ids)), lengths)
    keep = flat < limit
    tokens, rows = torch.from_numpy(flat[keep]), torch.from_numpy(owner[keep])
    sums = torch.zeros((len(ids), matrix.shape[1]), dtype=matrix.dtype).index_add_(0, rows, matrix[tokens])
    counts = torch.bincount(rows, minlength=len(ids)).to(matrix.dtype).unsqueeze(1)
    return sums / counts  # 0 / 0: NaN


def text_rows(
    text: torch.Tensor, features: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor] | None, ridge: float = 1.0
) -> torch.Tensor:
    """Starting embedding rows for new items from their text `features` (the mean row of their text's
    tokens; NaN: no text). With `fit` (the features and rows of items the model knows), a ridge
    regression from features to rows, regularised by `ridge` times the features' mean variance: a
    new item starts where items with words like its own sit. Without one, the features themselves.
    An item with no text starts at the mean row (of the known items, else of the vocabulary `text`)."""
    default = text.mean(dim=0)
    out = features.clone()
    if fit is not None:
        x, y = fit
        ok = ~torch.isnan(x).any(dim=1)
        x, y = x[ok], y[ok]
        if len(x) >= MIN_TEXT_FIT:
            xm, default = x.mean(dim=0), y.mean(dim=0)
            xc = x - xm
            gram = xc.T @ xc
            lam = ridge * torch.trace(gram) / gram.shape[0] + 1e-9
            w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - default))
            out = default + (features - xm) @ w
    out[torch.isnan(out).any(dim=1)] = default
    return out


def _grown_adapter(adapter_dir: str, out_dir: str, model: Any, new_ids: Sequence[int]) -> str:
    """A copy of a peft adapter in `out_dir` whose trainable item rows also cover `new_ids`, starting
    from `model`'s rows for them (the adapter's own rows are kept). An adapter that trains no item
    rows is copied as it is."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    indices = cfg.get("trainable_token_indices")
    if indices:
        t5 = _base_t5(model)
        if isinstance(indices, list):
            cfg["trainable_token_indices"] = [*indices, *new_ids]
        else:
            cfg["trainable_token_indices"] = {name: [*ids, *new_ids] for name, ids in indices.items()}
        for key, delta in list(weights.items()):
            if key.endswith(".token_adapter.trainable_tokens_delta"):
                module = key.removeprefix("base_model.model.").removesuffix(".token_adapter.trainable_tokens_delta")
                rows = _base_weight(t5.get_submodule(module))[list(new_ids)].detach().to(delta.dtype).cpu()
                weights[key] = torch.cat([delta, rows]).contiguous()
    (Path(out_dir) / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, str(Path(out_dir) / "adapter_model.safetensors"))
    return out_dir


def _token_noise(token: str, matrix: int, width: int) -> torch.Tensor:
    """Unit normal noise that depends on the token (and which matrix) only."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{matrix}:{token}".encode()))
    return torch.randn(width, generator=gen)


def _base_t5(model: Any) -> Any:
    """The T5 under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_weight(module: Any) -> torch.Tensor:
    """A layer's own weight, under any peft trainable-tokens wrapper."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    while isinstance(module, AuxiliaryTrainingWrapper):
        module = module.original_module
    weight: torch.Tensor = module.weight
    return weight


def _own_head(model: Any) -> bool:
    """Whether the output head is a matrix of its own (T5 v1.1, Flan) rather than the input embedding."""
    t5 = _base_t5(model)
    return bool(_base_weight(t5.lm_head).data_ptr() != _base_weight(t5.shared).data_ptr())


def _embedding_names(model: Any) -> list[str]:
    """The module names of the input embedding and the output head, as peft's trainable tokens name them."""
    t5 = _base_t5(model)
    return [next(n for n, m in t5.named_modules() if m is t5.shared), "lm_head"]


@contextmanager
def _peft_keeps_own_head(model: Any) -> Iterator[None]:
    """While peft wraps or loads an adapter: a model with a head of its own does not list it among
    the weights tied to the input embedding. peft ties every module T5's `_tied_weights_keys` lists
    to the input embedding's trainable tokens, and T5 lists lm_head whether or not the checkpoint
    shares it (transformers 5 even reports every T5 as tied): on Flan, a fresh adapter would serve
    the item tokens' input rows as their output rows, changing every score before any training."""
    t5 = _base_t5(model)
    if not _own_head(t5):
        yield
        return
    mine = "_tied_weights_keys" in t5.__dict__
    before = t5.__dict__.get("_tied_weights_keys")
    t5._tied_weights_keys = {k: v for k, v in t5._tied_weights_keys.items() if k != "lm_head.weight"}
    try:
        yield
    finally:
        if mine:
            t5._tied_weights_keys = before
        else:
            del t5._tied_weights_keys


def _untie_output_head(model: Any, kept: torch.Tensor, rows: int) -> None:
    """Give `model` back its own output head after a resize tied it: `kept`'s rows, then new ones
    (filled in by the caller), and no tie for save_pretrained or a later resize to restore."""
    head = model.get_output_embeddings()
    weight = torch.zeros((rows, kept.shape[1]), dtype=kept.dtype, device=kept.device)
    weight[: min(rows, kept.shape[0])] = kept[:rows]
    head.weight = torch.nn.Parameter(weight)
    _base_t5(model).all_tied_weights_keys.pop("lm_head.weight", None)


def _peft_wrappers(model: Any) -> set[int]:
    """The ids of the peft layers and wrappers in `model` now (none in a model peft never touched)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    return {id(m) for m in model.modules() if isinstance(m, kinds)}


def _strip_peft_wrappers(model: Any, keep: set[int]) -> None:
    """Put back the module each peft layer or wrapper not in `keep` replaced (its base layer, or the
    original of a modules_to_save / trainable-tokens wrapper), everywhere it is referenced."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    while True:
        found = next(
            (
                (name, m)
                for name, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper) and id(m) not in keep
            ),
            None,
        )
        if found is None:
            return
        name, module = found
        original = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, original)


def set_threads(n: int) -> None:
    """torch's CPU threads for this process (0: leave torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PooledDropout(torch.nn.Module):
    """Dropout whose masks are windows of one pre-drawn pool at random offsets. On the CPU, drawing a
    fresh random number per activation costs more than the rest of a tiny T5's step (40% of it on
    MovieLens-100K); a window of an i.i.d. pool is still an i.i.d. mask, and windows at random offsets
    of a pool much larger than one activation are close to independent across calls."""

    def __init__(self, p: float, pool: torch.Tensor) -> None:
        super().__init__()
        self.p = p
        self.pool = pool  # shared by every layer: kept/(1-p) or 0, flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        if n > self.pool.numel():
            return torch.nn.functional.dropout(x, self.p, True)
        start = int(torch.randint(0, self.pool.numel() - n + 1, ()).item())
        return x * self.pool[start : start + n].view_as(x).to(x.dtype)


def pool_dropout(model: torch.nn.Module, size: int = 1 << 24) -> int:
    """Replace every nn.Dropout in `model` by a PooledDropout (one pool of `size` masks per rate);
    returns how many were replaced. Dropout holds no weights: the saved model is the same."""
    pools: dict[float, torch.Tensor] = {}
    found = [(name, m.p) for name, m in model.named_modules() if type(m) is torch.nn.Dropout and m.p > 0]
    for name, p in found:
        if p not in pools:
            pools[p] = (torch.rand(size) >= p).float() / (1 - p)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PooledDropout(p, pools[p]))
    return len(found)


class Trainer:
    """AdamW over a Recommender's trainable weights with linear warmup then cosine decay to 10% of
    the peak rate, gradient clipping at 1. `step` takes token ids, so the loop stays torch-free.

    Under a one-token-per-item scheme the loss is a full softmax over the item tokens at the first
    decoding step (what ranking reads), with `label_smoothing`; otherwise it is the token-level loss
    over the identifier. The weights train in fp32; on CUDA the forward pass runs under bf16 autocast
    when that is the model's dtype (STREAMREC_MODEL__DTYPE)."""

    def __init__(
        self,
        rec: Recommender,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        total_steps: int,
        label_smoothing: float = 0.0,
    ) -> None:
        self.rec = rec
        if any(p.dtype != torch.float32 for p in rec.model.parameters()):
            # A model loaded for serving (the online increment's): fp32 master weights for AdamW,
            # while autocast keeps computing in the served dtype on CUDA.
            rec.model.float()
        self.params = [p for p in rec.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.label_smoothing = label_smoothing
        # The tokenizer's own padding id: 0 in every T5 vocabulary, but a real token in others.
        self.pad_id = int(rec.tokenizer.pad_token_id)
        # Both may be shortened by the loop once it knows how many steps its time budget allows.
        self.warmup_steps = max(1, warmup_steps)
        self.total_steps = max(1, total_steps)
        if rec.device.type == "cpu":
            pool_dropout(rec.model)
        self.autocast = rec.autocast
        # The item tokens, in the order `item_log_probs` scores them, and each one's column.
        tokens = rec.item_token_ids
        self.item_tokens = torch.tensor(tokens, dtype=torch.long, device=rec.device) if tokens else None
        self.column = {t: n for n, t in enumerate(tokens)}

        def factor(step: int) -> float:
            warmup = self.warmup_steps
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def train_mode(self, on: bool) -> None:
        self.rec.model.train(on)

    def _loss(self, input_ids: torch.Tensor, labels: Sequence[Sequence[int]]) -> torch.Tensor:
        rec = self.rec
        mask = (input_ids != self.pad_id).long()
        cols = [self.column.get(row[0], -1) if len(row) == 2 else -1 for row in labels]
        if self.item_tokens is not None and min(cols) >= 0:
            start = torch.full((len(labels), 1), rec.start_token_id, dtype=torch.long, device=rec.device)
            logits = rec.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0, :]
            target = torch.tensor(cols, dtype=torch.long, device=rec.device)
            return torch.nn.functional.cross_entropy(
                logits[:, self.item_tokens].float(), target, label_smoothing=self.label_smoothing
            )
        label_ids = _pad(labels, -100, rec.device)
        loss: torch.Tensor = rec.model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        return loss

    def step(self, inputs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> float:
        """One optimisation step on a batch; returns the loss."""
        input_ids = _pad(inputs, self.pad_id, self.rec.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self._loss(input_ids, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.item())


def _pad(rows: Sequence[Sequence[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    t = torch.full((len(rows), width), value, dtype=torch.long)
    for n, r in enumerate(rows):
        t[n, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return t.to(device)
