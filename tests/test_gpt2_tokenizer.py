"""Tests for `gpt_keras.tokenizers.GPT2Tokenizer`: ids equal Hugging Face's `GPT2TokenizerFast`
built from the same files, round trips, `tf.data`, SavedModel, save/load and errors."""

import inspect
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import tensorflow as tf

from gpt_keras.serving import op_types
from gpt_keras.tokenizers import GPT2Tokenizer, load_tokenizer
from gpt_keras.tokenizers.gpt2 import bytes_to_unicode
from tests import conftest
from tests.test_tokenizers import _Serving, decoded  # shared with the other tokenizer suite

DATA = Path(conftest.SHARED_DATA)
ENCODER, MERGES = DATA / "gpt2" / "encoder.json", DATA / "gpt2" / "vocab.bpe"

EDGE_CASES = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "Hello world",
    " Hello  world   ",
    "trailing spaces   ",
    "  leading spaces",
    "a  b   c    d",
    "tabs\tand\t\ttabs \t x\t",
    "lines\nand\n\nlines \n x\n \n",
    "crlf\r\n\r\nend\r\n",
    "mixed \t\n  \u00a0\u3000 whitespace\u2028\u2029x \x85y",
    "\x1c\x1d\x1e\x1f are not whitespace for GPT-2  \x1cx",
    "it's they're we've I'm you'll he'd",
    "IT'S THEY'RE 'S 'T 'Re 'LL",
    "'s 't 're 've 'm 'll 'd 'x ''s",
    "rock 'n' roll, 'tis 'twas o'clock",
    "a  's b\t's c\n'd",
    "numbers 1234567890 3.14159 1,000,000 ٣٤ १२ Ⅻ ½",
    "punctuation!!! ??? ... --- (a) [b] {c} <d> @#$%^&*",
    "Ünïcödé — “quotes” … café naïve",
    "你好，世界！中文分词 日本語 한국어",
    "Привет мир שלום עולם مرحبا नमस्ते",
    "emoji 🙂 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining e\u0301 n\u0303 a\u0308\u0304",
    "\x00 NUL \ufeff BOM zero\u200bwidth soft\u00adhyphen \ufffd",
    "Unicode 16 letters \u1c89\u1c8a \U000105c0 digits \U00010d40\U00010d41",
    "<|endoftext|>",
    "a<|endoftext|>b",
    "one  <|endoftext|>  two",
    "<|endoftext|><|endoftext|>x<|endoftext|>",
    "<|endoftext|",
    "<|endoftext|>'s",
    "x" * 300,
    " the" * 50,
]


def hf_tokenizer():
    """`GPT2TokenizerFast` from the two files. transformers 5 takes `vocab`/`merges` (and silently
    builds an empty vocabulary from 4.x's `vocab_file`/`merges_file`); 4.x takes the latter."""
    transformers = pytest.importorskip("transformers")
    parameters = inspect.signature(transformers.GPT2TokenizerFast.__init__).parameters
    names = ("vocab_file", "merges_file") if "vocab_file" in parameters else ("vocab", "merges")
    tokenizer = transformers.GPT2TokenizerFast(**dict(zip(names, (str(ENCODER), str(MERGES)))))
    assert len(tokenizer) == 50257 and tokenizer("Hello world")["input_ids"] == [15496, 995]
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    if not ENCODER.exists():
        pytest.skip(f"{ENCODER} is absent (shared data checkout)")
    return GPT2Tokenizer(ENCODER, MERGES)


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizer()


@pytest.fixture(scope="module")
def lines():
    """3000 Tiny Shakespeare lines from all over the play text, newline kept."""
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return text.splitlines(keepends=True)[::13][:3000]


def assert_same_ids(ours, theirs, texts):
    mismatches = [(t, o, r) for t, o, r in zip(texts, ours, theirs) if o != r]
    assert not mismatches, f"{len(mismatches)} texts differ, e.g. {mismatches[:3]!r}"


# --- Hugging Face parity ---------------------------------------------------------------------


def test_vocabulary(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.end_of_text_id) == (50257, 50256)
    assert len(tokenizer.merges) == 50000 and tokenizer.merges[0] == ("Ġ", "t")
    assert tokenizer.tokenize("Hello world").numpy().tolist() == [15496, 995]


def test_ids_match_hf_on_shakespeare(tokenizer, hf, lines):
    ours = []
    for start in range(0, len(lines), 1000):  # three batches
        ours += tokenizer.tokenize(lines[start:start + 1000]).to_list()
    assert_same_ids(ours, hf(lines)["input_ids"], lines)
    whole = "".join(lines[:500])  # one long string: runs of newlines and spaces across lines
    assert tokenizer.tokenize(whole).numpy().tolist() == hf(whole)["input_ids"]


def test_ids_match_hf_on_edge_cases(tokenizer, hf):
    assert_same_ids(tokenizer.tokenize(EDGE_CASES).to_list(), hf(EDGE_CASES)["input_ids"],
                    EDGE_CASES)
    for text in EDGE_CASES[:8]:
        assert tokenizer.tokenize(text).numpy().tolist() == hf(text)["input_ids"]


def test_ids_match_hf_on_random_mixtures(tokenizer, hf):
    """Strings assembled from the pieces the pre-tokenization regex treats specially: runs of
    mixed whitespace before words, contractions after spaces, the special token's parts."""
    atoms = [" ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x85", "\x1c", "'", "'s",
             "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "a", "The", "hello", "7", "42", "!",
             "?.", "é", "ß", "你", "🙂", "\u0301", "٣", "<|endoftext|>", "<|", "|>", "endoftext"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    assert_same_ids(tokenizer.tokenize(texts).to_list(), hf(texts)["input_ids"], texts)


def test_character_classes_match_hf(tokenizer, hf):
    """Letters, digits, whitespace and the rest: a sample of all code points, each between a
    letter, a digit, a space and punctuation, so that a class difference changes the words."""
    code_points = list(range(0, 0x110000, 89)) + list(range(0x2000, 0x2030)) + [
        0x85, 0xA0, 0x1680, 0x205F, 0x3000, 0x1C, 0x1F, 0x1C89, 0xA7CB, 0x105C0, 0x16D40,
        0x10D40, 0x116D0, 0x1E5F1,
    ]
    texts = [f"a{c}{c} 1{c} {c}!{c}  {c}" for c in map(chr, code_points)
             if not 0xD800 <= ord(c) < 0xE000]
    assert_same_ids(tokenizer.tokenize(texts).to_list(), hf(texts)["input_ids"], texts)


def test_special_token_in_text_can_be_read_as_text(tokenizer, hf):
    plain = GPT2Tokenizer(ENCODER, MERGES, special_tokens_in_text=False)
    texts = ["a<|endoftext|>b", "<|endoftext|>", "x  <|endoftext|>  y"]
    expected = hf(texts, split_special_tokens=True)["input_ids"]
    assert plain.tokenize(texts).to_list() == expected
    assert all(plain.end_of_text_id not in ids for ids in expected)
    assert tokenizer.tokenize("a<|endoftext|>b").numpy().tolist() == [64, 50256, 65]


# --- round trips, graphs, files --------------------------------------------------------------


def test_detokenize_round_trips(tokenizer, hf, lines):
    texts = lines[:200] + EDGE_CASES
    ids = tokenizer.tokenize(texts)
    assert decoded(tokenizer.detokenize(ids)) == texts
    assert decoded(tokenizer.detokenize(ids)) == [hf.decode(row) for row in ids.to_list()]
    for text in EDGE_CASES[:6]:
        assert tokenizer.detokenize(tokenizer.tokenize(text)).numpy().decode() == text
    # A character cut between tokens, ids outside the vocabulary and invalid input bytes.
    assert tokenizer.detokenize([19526]).numpy() == "\ufffd".encode()  # first bytes of "你"
    assert tokenizer.detokenize([50256, 50257, -1, 64]).numpy().decode() == (
        "<|endoftext|>\ufffd\ufffda"
    )
    assert tokenizer.detokenize(tokenizer.tokenize(tf.constant(b"a\xffb"))).numpy() == (
        "a\ufffdb".encode()
    )


def test_bytes_to_unicode_is_gpt2s():
    mapping = bytes_to_unicode()
    assert len(set(mapping.values())) == 256
    assert (mapping[ord(" ")], mapping[ord("\n")], mapping[ord("a")], mapping[255]) == (
        "Ġ", "Ċ", "a", "ÿ"
    )


def test_dataset_map_matches_eager(tokenizer, lines):
    texts = lines[:40] + EDGE_CASES
    expected = tokenizer.tokenize(texts).to_list()
    per_line = tf.data.Dataset.from_tensor_slices(texts).map(tokenizer.tokenize)
    assert [ids.numpy().tolist() for ids in per_line] == expected
    batched = tf.data.Dataset.from_tensor_slices(texts).batch(16).map(tokenizer.tokenize)
    assert [row for ids in batched for row in ids.to_list()] == expected
    round_trip = tf.data.Dataset.from_tensor_slices(texts).batch(16).map(
        lambda text: tokenizer.detokenize(tokenizer.tokenize(text))
    )
    assert [s.decode() for batch in round_trip for s in batch.numpy()] == texts


def test_save_load_describe(tokenizer, lines, tmp_path):
    path = tokenizer.save(str(tmp_path / "tok"))
    assert os.listdir(tmp_path / "tok") == ["tokenizer.json"]
    description = tokenizer.describe()
    assert description["kind"] == "gpt2"
    assert (description["vocab_size"], description["end_of_text_id"]) == (50257, 50256)
    assert GPT2Tokenizer.load(str(tmp_path / "tok")).describe() == description
    restored = load_tokenizer(tmp_path / "tok")
    assert type(restored) is GPT2Tokenizer and restored.describe() == description
    assert restored.tokenize(lines[:50]).to_list() == tokenizer.tokenize(lines[:50]).to_list()
    plain = GPT2Tokenizer(ENCODER, MERGES, special_tokens_in_text=False)
    assert plain.describe()["sha256"] != description["sha256"]
    plain.save(str(tmp_path / "plain"))
    assert load_tokenizer(tmp_path / "plain").special_tokens_in_text is False
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["merges"][:2] == ["Ġ t", "Ġ a"]


def test_from_directory_with_either_file_names(tokenizer, tmp_path):
    assert GPT2Tokenizer.from_directory(ENCODER.parent).describe() == tokenizer.describe()
    shutil.copy(ENCODER, tmp_path / "vocab.json")
    shutil.copy(MERGES, tmp_path / "merges.txt")
    assert GPT2Tokenizer.from_directory(tmp_path).describe() == tokenizer.describe()
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="neither encoder.json \\+ vocab.bpe nor vocab.json"):
        GPT2Tokenizer.from_directory(tmp_path)


def test_saved_model_round_trip(tokenizer, lines, tmp_path):
    module = _Serving(tokenizer)
    directory = str(tmp_path / "saved_model")
    tf.saved_model.save(
        module, directory,
        signatures={"tokenize": module.tokenize, "detokenize": module.detokenize},
    )
    loaded = tf.saved_model.load(directory)
    for texts in (lines[:7], EDGE_CASES):
        expected = tokenizer.tokenize(texts)
        served = loaded.signatures["tokenize"](text=tf.constant(texts))
        assert [row[:n] for row, n in zip(served["ids"].numpy().tolist(),
                                          served["lengths"].numpy())] == expected.to_list()
        text = loaded.signatures["detokenize"](ids=served["ids"], lengths=served["lengths"])
        assert decoded(text["text"]) == texts
    # Only core TensorFlow ops (tf.raw_ops): a stock TF Serving without TF Text can run it.
    assert {op for op in op_types(directory) if not hasattr(tf.raw_ops, op)} == set()


# --- errors ----------------------------------------------------------------------------------


def test_bad_vocabularies_and_merges(tokenizer, tmp_path):
    vocabulary = tokenizer.vocabulary
    with pytest.raises(ValueError, match="Cannot read the GPT-2 vocabulary"):
        GPT2Tokenizer(tmp_path / "missing.json", MERGES)
    with pytest.raises(ValueError, match="Cannot read the GPT-2 merges"):
        GPT2Tokenizer(ENCODER, tmp_path / "missing.bpe")
    with pytest.raises(ValueError, match="lacks the byte tokens"):
        GPT2Tokenizer({k: v for k, v in vocabulary.items() if k != "Ġ"}, [])
    with pytest.raises(ValueError, match="lacks '<\\|endoftext\\|>'"):
        GPT2Tokenizer({k: v for k, v in vocabulary.items() if k != "<|endoftext|>"}, [])
    with pytest.raises(ValueError, match="outside GPT-2's byte alphabet"):
        GPT2Tokenizer({**vocabulary, " the": 60000}, [])
    with pytest.raises(ValueError, match="same id to more than one token"):
        GPT2Tokenizer({**vocabulary, "ĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠĠ": 0}, [])
    with pytest.raises(ValueError, match="merge 1 .*missing from the vocabulary: \\['Ġzzzq'"):
        GPT2Tokenizer(vocabulary, ["Ġ t", "Ġzzzq x"])
    with pytest.raises(ValueError, match="merge 0 must be 'left right'"):
        GPT2Tokenizer(vocabulary, ["Ġ t x"])
    with pytest.raises(ValueError, match="more than once"):
        GPT2Tokenizer(vocabulary, ["Ġ t", "Ġ t"])
    with pytest.raises(ValueError, match="special_tokens_in_text` must be True or False"):
        GPT2Tokenizer(vocabulary, [], special_tokens_in_text="yes")
    with open(tmp_path / "tokenizer.json", "w") as f:
        json.dump({"kind": "gpt2", "version": 1, "vocabulary": {}, "merges": []}, f)
    with pytest.raises(ValueError, match="invalid GPT-2 vocabulary"):
        load_tokenizer(tmp_path)
