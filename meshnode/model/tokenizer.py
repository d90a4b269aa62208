"""Tokenizers and chat templates, from ``tokenizer.json`` or from GGUF metadata.

A Hugging Face folder's ``tokenizer.json`` loads with the ``tokenizers``
library as is. A GGUF file's byte-level BPE (``tokenizer.ggml.model`` =
``gpt2``) is rebuilt from its tokens, merges and token types, the way
transformers' GGUF integration does, with the pre-tokenizer chosen by
``tokenizer.ggml.pre`` as llama.cpp chooses it; a SentencePiece BPE
(``llama``: Llama 2, Mistral, TinyLlama files) from its tokens, scores and
token types, its merges derived from the scores as transformers derives them.
Chat templates are rendered with jinja2 in the same sandboxed environment and
with the same variables as transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from meshnode.errors import TokenizerError

Message = dict[str, Any]

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: tokenizer.ggml.pre -> split regex applied before byte-level encoding
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
#: pre-tokenizers that split every digit apart, then use GPT-2's split (llama.cpp's SMOLLM)
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact"}

_CONTROL, _USER_DEFINED = 3, 4
#: GGUF architectures whose SentencePiece vocabulary is rebuilt the Gemma way
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


class Tokenizer:
    """encode / decode / chat template of one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        ids = {int(i) for i in eos_ids}
        eos = self.special_tokens.get("eos_token")
        if eos is not None and backend.token_to_id(eos) is not None:
            ids.add(backend.token_to_id(eos))
        self.eos_ids = frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The rendered conversation, as transformers' apply_chat_template(tokenize=False)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        variables = {**self.special_tokens, **kwargs}
        try:
            return _compile(self.chat_template).render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation (the template writes its own special tokens)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _compile(template: str) -> Any:
    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# --- Hugging Face folders ------------------------------------------------------


def tokenizer_from_folder(folder: Path, eos_ids: Sequence[int] = ()) -> Tokenizer:
    """tokenizer.json, with tokenizer_config.json / chat_template.jinja when present."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise TokenizerError(f"{path}: {exc}") from exc
    settings = _read_json(folder / "tokenizer_config.json")
    template = settings.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = settings.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    generation = _read_json(folder / "generation_config.json").get("eos_token_id")
    extra = generation if isinstance(generation, list) else [generation] if generation else []
    return Tokenizer(
        backend, chat_template=template, special_tokens=special, eos_ids=[*eos_ids, *extra]
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


# --- GGUF metadata -------------------------------------------------------------


def tokenizer_from_gguf(metadata: Any) -> Tokenizer:
    """Build the tokenizer a GGUF file describes; ``metadata.value(key)`` reads its keys."""
    model = metadata.value("tokenizer.ggml.model")
    tokens = list(metadata.value("tokenizer.ggml.tokens") or [])
    types = list(metadata.value("tokenizer.ggml.token_type") or [])
    if model == "gpt2":
        merges = list(metadata.value("tokenizer.ggml.merges") or [])
        if not tokens or not merges:
            raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or merges")
        backend = _byte_level_bpe(tokens, merges, types, metadata.value("tokenizer.ggml.pre"))
    elif model == "llama":
        scores = list(metadata.value("tokenizer.ggml.scores") or [])
        if not tokens or len(scores) != len(tokens):
            raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or their scores")
        if metadata.value("general.architecture") in _GEMMA_ARCHITECTURES:
            backend = _gemma_sentencepiece_bpe(tokens, types)
        else:
            backend = _sentencepiece_bpe(tokens, scores, types)
    else:
        raise TokenizerError(
            f"GGUF tokenizer model {model!r} is not supported "
            "('gpt2': byte-level BPE, 'llama': SentencePiece BPE)"
        )
    special = {}
    for name, key in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        index = metadata.value(f"tokenizer.ggml.{key}_token_id")
        if index is not None and 0 <= int(index) < len(tokens):
            special[name] = tokens[int(index)]
    # SentencePiece models start with BOS unless the file says otherwise (as llama.cpp does)
    add_bos = metadata.value("tokenizer.ggml.add_bos_token", model == "llama")
    if add_bos and "bos_token" in special:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    eos = metadata.value("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        backend,
        chat_template=metadata.value("tokenizer.chat_template"),
        special_tokens=special,
        eos_ids=() if eos is None else (int(eos),),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: Any) -> Backend:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = Backend(
        BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    backend.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types)
        if kind == _USER_DEFINED and t in vocab
    ]
    backend.add_tokens(user)
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int]) -> Backend:
    """SentencePiece BPE as transformers' GGUF integration rebuilds it (LlamaTokenizer):
    merges derived from the vocabulary and ordered by score, byte fallback for text
    outside it, and "▁" for spaces, prepended to the first word."""
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(
        BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, tokens, scores),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types)
            if k == _USER_DEFINED
        ]
    )
    return backend


def _gemma_sentencepiece_bpe(tokens: list[str], types: list[int]) -> Backend:
    """Gemma's SentencePiece BPE as transformers' GGUF integration rebuilds it
    (``gemma_tokenizer``, ``GemmaTokenizer``): tokens of only spaces respelled with "▁",
    merges ordered by position in the file (Gemma's scores do not follow its merge
    order), spaces as "▁" with no prefix added, split after each space, byte fallback."""
    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    order = [-float(i) for i in range(len(spelled))]
    backend = Backend(
        BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, spelled, order),
            fuse_unk=True,
            unk_token="<unk>" if "<unk>" in vocab else None,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(
        pattern=" ", behavior="merged_with_previous", invert=False
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in vocab
        ]
    )
    return backend


def _merges_from_scores(
    vocab: dict[str, int], tokens: list[str], scores: list[float]
) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a piece into two pieces
    of the vocabulary, best piece score first, then longer left and right parts first
    (transformers' ``generate_merges``)."""
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _pre_tokenizer(pre: Any) -> Any:
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
