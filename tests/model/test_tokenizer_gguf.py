"""GGUF tokenizers rebuilt from metadata, against transformers' GGUF integration.

A SentencePiece BPE (``tokenizer.ggml.model`` = ``llama``, as Llama 2, Mistral
and TinyLlama files carry) has no merges in the file: both sides derive them
from the scores. The vocabulary here is small and synthetic, with byte tokens,
so text outside it goes through byte fallback.
"""

from __future__ import annotations

import gguf
import pytest

from meshnode.errors import TokenizerError
from meshnode.model.gguf_file import GGUFFile
from meshnode.model.tokenizer import tokenizer_from_gguf

PIECES = [
    "▁",
    *"abcdefghijklmnopqrstuvwxyz",
    "▁t",
    "he",
    "▁the",
    "▁a",
    "in",
    "▁in",
    "er",
    "▁c",
    "at",
    "▁cat",
    "▁s",
    "▁sat",
    "on",
    "▁on",
    "▁m",
    "▁mat",
    ".",
    ",",
    "▁he",
    "ll",
    "llo",
    "▁hello",
    "▁w",
    "or",
    "ld",
    "▁world",
    "T",
    "H",
    "▁T",
    "▁The",
    "!",
    "?",
    "<think>",
]
TEXTS = [
    "The cat sat on the mat.",
    "hello world",
    "  hello  ",
    "héllo 日本!",
    "a\nb\n\nc",
    "<s>the</s> cat",
    "wait <think> here",
    "",
]


def _write_sentencepiece_gguf(path, add_bos: bool | None = True, model: str = "llama") -> None:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(PIECES) - 1) + [4]  # <think>: user-defined
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    _write_sentencepiece_gguf(path)
    return path


def test_sentencepiece_tokens_match_transformers(sentencepiece_file):
    """When a GGUF carries a SentencePiece BPE, then encode and decode equal transformers'
    (merges from scores, byte fallback, the prefix space, special and user-defined tokens)."""
    from transformers import AutoTokenizer

    ours = tokenizer_from_gguf(GGUFFile(sentencepiece_file))
    theirs = AutoTokenizer.from_pretrained(
        str(sentencepiece_file.parent), gguf_file=sentencepiece_file.name
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # BOS
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hello world") == [1, 307, 308, 309, 310]  # "▁hello" "▁w" "or" "ld"
    assert ours.eos_ids == frozenset({2})


def test_add_bos_false_is_honoured(tmp_path):
    """When the file says add_bos_token = false, then no BOS is prepended."""
    _write_sentencepiece_gguf(tmp_path / "no-bos.gguf", add_bos=False)
    assert tokenizer_from_gguf(GGUFFile(tmp_path / "no-bos.gguf")).encode("the") == [288]  # "▁the"


def test_unknown_tokenizer_models_are_a_clear_error(tmp_path):
    """When the GGUF names a tokenizer model we do not build, then the error names it."""
    _write_sentencepiece_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        tokenizer_from_gguf(GGUFFile(tmp_path / "bert.gguf"))
