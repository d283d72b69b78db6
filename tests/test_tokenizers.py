"""Tests for `gpt_keras.tokenizers`: in-graph character and byte-level BPE tokenizers."""

import hashlib
import json
import math
import os
import random
from pathlib import Path

import pytest
import regex
import tensorflow as tf

from gpt_keras.serving import op_types
from gpt_keras.tokenizers import ByteLevelBPETokenizer, CharTokenizer, load_tokenizer
from tests import conftest

SHAKESPEARE = Path(conftest.SHAKESPEARE)

# Text that must survive a round trip unchanged, whatever its characters.
UNICODE_CASES = [
    "",
    "a",
    "你好，世界！中文分词",
    "emoji 🙂, family 👨‍👩‍👧‍👦, flag 🇫🇷, skin tone 👍🏽",
    "combining: e\u0301 n\u0303 a\u0308\u0304 (decomposed)",
    "tabs\tand\nnewlines\r\n  multiple   spaces \v\f\x1c\x85\u2028\u2029 end  ",
    "   ",
    "\n\n\n",
    "\x00 NUL, \ufeff BOM, zero\u200bwidth, nbsp\u00a0, ideographic\u3000space",
    "Ünïcödé — “quotes” … ½ ٣ १२ नमस्ते Привет שלום",
    "it's they're we've I'm you'll he'd 'S 'tis",
    "aaaaaaa mmmm hmmmm zzzzzzzzzz 1234567890 3.14159",
    "<|endoftext|> is text here",
]


def reference_encode(tokenizer, text):
    """GPT-2's `bpe()` in plain Python over `tokenizer.merges` and `tokenizer.pattern`."""
    ranks = {pair: rank for rank, pair in enumerate(tokenizer.merges)}
    ids = []
    for word in regex.findall(tokenizer.pattern, text):
        tokens = list(word.encode("utf-8"))
        while len(tokens) > 1:
            rank = min(ranks.get(pair, math.inf) for pair in zip(tokens, tokens[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(tokens):
                if tuple(tokens[i:i + 2]) == tokenizer.merges[rank]:
                    merged.append(256 + rank)
                    i += 2
                else:
                    merged.append(tokens[i])
                    i += 1
            tokens = merged
        ids.extend(tokens)
    return ids


def decoded(strings):
    return [s.decode("utf-8") for s in strings.numpy().tolist()]


@pytest.fixture(scope="module")
def shakespeare():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is absent (shared data checkout)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def lines(shakespeare):
    """300 non-empty held-out lines (after the first 100 KB), newline kept."""
    held_out = shakespeare[100_000:].splitlines(keepends=True)
    return [line for line in held_out if line.strip()][:300]


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return ByteLevelBPETokenizer.train(shakespeare[:100_000], vocab_size=1024)


@pytest.fixture(scope="module")
def char(shakespeare):
    return CharTokenizer.train(shakespeare)


@pytest.fixture(scope="module")
def tokenizers(char, bpe):
    return {"char": char, "bpe": bpe}


# --- CharTokenizer -------------------------------------------------------------------------------


def test_char_vocabulary_is_nanogpts(shakespeare, char):
    chars = sorted(set(shakespeare))
    assert len(chars) == 65 and list(char.chars) == chars
    assert (char.vocab_size, char.end_of_text_id, char.unknown_id) == (67, 65, 66)
    sample = shakespeare[:2000]
    assert char.tokenize(sample).numpy().tolist() == [chars.index(c) for c in sample]


def test_char_training_streams_chunks(shakespeare):
    chunks = (shakespeare[i:i + 4096] for i in range(0, len(shakespeare), 4096))
    assert CharTokenizer.train(chunks).chars == CharTokenizer.train(shakespeare).chars


def test_char_round_trip_and_code_points(lines):
    char = CharTokenizer.train(lines + UNICODE_CASES)
    texts = lines[:50] + UNICODE_CASES
    ids = char.tokenize(texts)
    assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
    assert decoded(char.detokenize(ids)) == texts
    for text in UNICODE_CASES:
        one = char.tokenize(text)
        assert one.shape.rank == 1 and len(one) == len(text)  # one id per code point
        assert char.detokenize(one).numpy().decode("utf-8") == text
    assert len(char.tokenize("👨‍👩‍👧")) == 5  # man, ZWJ, woman, ZWJ, girl


def test_char_special_and_unknown_ids(char):
    ids = char.tokenize(["abc€", "字"])
    assert ids[0, -1] == char.unknown_id and ids[1].numpy().tolist() == [char.unknown_id]
    assert char.tokenize(tf.constant(b"a\xffb"))[1] == char.unknown_id  # invalid UTF-8
    special = [char.end_of_text_id, char.unknown_id, char.vocab_size, -1, 0]
    assert char.detokenize(special).numpy().decode() == "<|endoftext|>\ufffd\ufffd\ufffd\n"


# --- ByteLevelBPETokenizer -----------------------------------------------------------------------


def test_bpe_matches_python_reference(bpe, lines):
    texts = lines + UNICODE_CASES
    ids = bpe.tokenize(texts)
    assert ids.to_list() == [reference_encode(bpe, text) for text in texts]
    assert bpe.tokenize(lines[0]).numpy().tolist() == reference_encode(bpe, lines[0])


def test_bpe_round_trip_is_exact_for_any_text(bpe, lines):
    texts = lines[:100] + UNICODE_CASES
    assert decoded(bpe.detokenize(bpe.tokenize(texts))) == texts
    for text in UNICODE_CASES:
        assert bpe.detokenize(bpe.tokenize(text)).numpy().decode("utf-8") == text
    # Invalid UTF-8 input is replaced by U+FFFD, as is a character cut between tokens on output.
    assert bpe.detokenize(bpe.tokenize(tf.constant(b"a\xffb"))).numpy() == "a\ufffdb".encode()
    assert bpe.detokenize([0xE4, 0xBD]).numpy() == "\ufffd".encode()


def test_bpe_merges_overlapping_pairs_left_to_right():
    tokenizer = ByteLevelBPETokenizer([(97, 97), (256, 256), (98, 97)])  # "aa", "aaaa", "ba"
    texts = ["aaaaa", "aaa", "baaa", "aaaaaaaaa", "a"]
    expected = [[257, 97], [256, 97], [98, 256, 97], [257, 257, 97], [97]]
    assert tokenizer.tokenize(texts).to_list() == expected
    assert [reference_encode(tokenizer, text) for text in texts] == expected


def test_bpe_vocabulary_size_and_compression(bpe, shakespeare):
    assert (bpe.vocab_size, bpe.end_of_text_id, len(bpe.merges)) == (1024, 1023, 767)
    held_out = shakespeare[-100_000:]
    ids = bpe.tokenize(held_out)
    assert 0 <= int(tf.reduce_min(ids)) and int(tf.reduce_max(ids)) < bpe.end_of_text_id
    assert len(held_out.encode("utf-8")) / len(ids) > 2.0
    assert bpe.detokenize([bpe.end_of_text_id, 1024]).numpy().decode() == "<|endoftext|>\ufffd"


def test_bpe_training_streams_chunks(shakespeare):
    text = shakespeare[:50_000]
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(len(text)), 60)) + sorted(rng.sample(range(1000), 300))
    cuts = sorted(set(cuts))  # many cuts fall inside words, some one character apart
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    whole = ByteLevelBPETokenizer.train(text, vocab_size=600)
    assert ByteLevelBPETokenizer.train(iter(chunks), vocab_size=600).merges == whole.merges


def test_bpe_small_corpus_warns_and_shrinks_vocabulary():
    with pytest.warns(UserWarning, match="supports only 1 merges"):
        tokenizer = ByteLevelBPETokenizer.train("abab", vocab_size=300)
    assert tokenizer.vocab_size == 258
    assert ByteLevelBPETokenizer.train("x y", vocab_size=257).tokenize("x y").numpy().tolist() == [
        120, 32, 121
    ]


# --- Both tokenizers: graphs, files, SavedModel ------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_dataset_map_matches_eager(tokenizers, lines, kind):
    tokenizer = tokenizers[kind]
    expected = tokenizer.tokenize(lines[:64]).to_list()
    per_line = tf.data.Dataset.from_tensor_slices(lines[:64]).map(tokenizer.tokenize)
    assert [ids.numpy().tolist() for ids in per_line] == expected
    batched = tf.data.Dataset.from_tensor_slices(lines[:64]).batch(10).map(tokenizer.tokenize)
    assert [row for ids in batched for row in ids.to_list()] == expected
    round_trip = tf.data.Dataset.from_tensor_slices(lines[:64]).batch(10).map(
        lambda text: tokenizer.detokenize(tokenizer.tokenize(text))
    )
    assert [s.decode() for batch in round_trip for s in batch.numpy()] == lines[:64]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tokenizers, lines, tmp_path, kind):
    tokenizer = tokenizers[kind]
    path = tokenizer.save(str(tmp_path / "tok"))
    assert os.listdir(tmp_path / "tok") == ["tokenizer.json"]  # no temporary file left behind
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == tokenizer.describe()["sha256"]
    for restored in (type(tokenizer).load(str(tmp_path / "tok")), load_tokenizer(tmp_path / "tok")):
        assert type(restored) is type(tokenizer)
        assert restored.describe() == tokenizer.describe()
        assert restored.tokenize(lines).to_list() == tokenizer.tokenize(lines).to_list()


def test_describe(char, bpe):
    assert char.describe()["kind"] == "char" and bpe.describe()["kind"] == "byte_level_bpe"
    assert set(bpe.describe()) == {"kind", "vocab_size", "end_of_text_id", "sha256"}
    smaller = ByteLevelBPETokenizer(bpe.merges[:-1])
    assert smaller.describe()["sha256"] != bpe.describe()["sha256"]
    assert smaller.describe()["vocab_size"] == bpe.vocab_size - 1


class _Serving(tf.Module):
    """What an export holds: a tokenizer and two signatures with dense inputs and outputs."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def tokenize(self, text):
        ids = self.tokenizer.tokenize(text)
        return {"ids": ids.to_tensor(default_value=-1), "lengths": ids.row_lengths()}

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="ids"),
        tf.TensorSpec([None], tf.int64, name="lengths"),
    ])
    def detokenize(self, ids, lengths):
        return {"text": self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(ids, lengths))}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_model_round_trip(tokenizers, lines, tmp_path, kind):
    module = _Serving(tokenizers[kind])
    directory = str(tmp_path / "saved_model")
    tf.saved_model.save(
        module, directory,
        signatures={"tokenize": module.tokenize, "detokenize": module.detokenize},
    )
    loaded = tf.saved_model.load(directory)
    # Two batch sizes; Shakespeare lines are in both vocabularies, the Unicode cases only in BPE's.
    for texts, exact in ((lines[:7], True), (UNICODE_CASES, kind == "bpe")):
        expected = module.tokenize(tf.constant(texts))
        served = loaded.signatures["tokenize"](text=tf.constant(texts))
        assert served["ids"].numpy().tolist() == expected["ids"].numpy().tolist()
        text = loaded.signatures["detokenize"](ids=served["ids"], lengths=served["lengths"])
        expected_text = module.detokenize(expected["ids"], expected["lengths"])["text"]
        assert decoded(text["text"]) == decoded(expected_text)
        if exact:
            assert decoded(text["text"]) == texts
    served = loaded.tokenize(tf.constant(lines[:3]))  # the restored tf.function, not a signature
    assert decoded(loaded.detokenize(served["ids"], served["lengths"])["text"]) == lines[:3]
    # Only core TensorFlow ops (tf.raw_ops): a stock TF Serving without TF Text can run it.
    assert {op for op in op_types(directory) if not hasattr(tf.raw_ops, op)} == set()


# --- Errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [CharTokenizer, ByteLevelBPETokenizer])
@pytest.mark.parametrize("corpus", ["", [], ["", ""]])
def test_empty_corpus_raises(cls, corpus):
    kwargs = {"vocab_size": 300} if cls is ByteLevelBPETokenizer else {}
    with pytest.raises(ValueError, match="empty corpus"):
        cls.train(corpus, **kwargs)


def test_training_errors():
    for vocab_size in (256, 0, "1024", 1024.0):
        with pytest.raises(ValueError, match="at least 257"):
            ByteLevelBPETokenizer.train("some text", vocab_size=vocab_size)
    with pytest.raises(ValueError, match="`str` chunks"):
        CharTokenizer.train([b"bytes"])
    with pytest.raises(ValueError, match="distinct one-character strings"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="merge 1 must be a pair of ids below 257"):
        ByteLevelBPETokenizer([(1, 2), (300, 1)])
    with pytest.raises(ValueError, match="more than once"):
        ByteLevelBPETokenizer([(1, 2), (1, 2)])
    with pytest.raises(ValueError, match="valid in Python's `regex` and in RE2"):
        ByteLevelBPETokenizer([], pattern=r"(?=lookahead)")


def test_bad_input_shapes_raise(char):
    with pytest.raises(ValueError, match="scalar string or a 1-D"):
        char.tokenize([["a"], ["b"]])
    with pytest.raises(ValueError, match=r"ids of shape `\[n\]`, `\[B, T\]`"):
        char.detokenize(tf.zeros([1, 2, 3], tf.int32))


def _write(directory, content):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(directory)


def test_bad_files_raise(tmp_path):
    with pytest.raises(ValueError, match="No tokenizer file at"):
        CharTokenizer.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Cannot read the tokenizer file"):
        CharTokenizer.load(_write(tmp_path / "json", "{not json"))
    char_dir = CharTokenizer(["a", "b"]).save(str(tmp_path / "char"))
    with pytest.raises(ValueError, match="not a ByteLevelBPETokenizer file: expected kind"):
        ByteLevelBPETokenizer.load(os.path.dirname(char_dir))
    bad = {"kind": "byte_level_bpe", "version": 1, "pattern": "x", "merges": [[1, 999]]}
    with pytest.raises(ValueError, match="invalid byte-level BPE vocabulary.*below 256"):
        ByteLevelBPETokenizer.load(_write(tmp_path / "merges", bad))
    with pytest.raises(ValueError, match="invalid character vocabulary"):
        CharTokenizer.load(
            _write(tmp_path / "chars", {"kind": "char", "version": 1, "chars": ["ab"]})
        )
    with pytest.raises(ValueError, match="format version 2"):
        CharTokenizer.load(_write(tmp_path / "version", {"kind": "char", "version": 2}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(_write(tmp_path / "kind", {"kind": "wordpiece", "version": 1}))
