import os
import tracemalloc

import numpy as np
import pytest

from gpt_keras import data
from gpt_keras.tokenizers import CharTokenizer

from tests.conftest import SHAKESPEARE  # noqa: E402


def write(path, content, mode="w"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        f.write(content)
    return str(path)


def test_read_text_keeps_every_character_across_small_chunks(tmp_path):
    text = "héllo 世界 🙂\nline two ü\n" * 50 + "no newline at the end 🎉"
    path = write(tmp_path / "a.txt", text)
    chunks = list(data.read_text(path, chunk_bytes=7))
    assert "".join(chunks) == text
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf\u00e9\n".encode("utf-8") + b"na\xefve\n", "wb")
    with pytest.raises(ValueError, match=r"latin1.txt: invalid UTF-8 at byte offset 8\. Convert"):
        list(data.read_text(path, chunk_bytes=3))


def test_invalid_utf8_offset_is_exact_after_a_character_cut_by_the_read(tmp_path):
    """"é" (2 bytes at offsets 2-3) is cut by the 3-byte reads; the invalid byte is at 5."""
    path = write(tmp_path / "cut.txt", b"ab\xc3\xa9c\xff\n", "wb")
    with pytest.raises(ValueError, match=r"cut.txt: invalid UTF-8 at byte offset 5\. Convert"):
        list(data.read_text(path, chunk_bytes=3))


def test_validation_text_is_counted_in_bounded_memory():
    """Characters and bytes of a 4M-token split, a 2^16-id chunk at a time (the old code decoded
    the whole split: ~30 MB for this one)."""
    text = "héllo wörld 🙂\n"
    tokenizer = CharTokenizer.train(text)
    ids = np.resize(tokenizer.tokenize(text).numpy().astype(np.uint16), 4_000_000)
    ids[::1000] = tokenizer.end_of_text_id  # dropped from the counts
    kept = ids[ids != tokenizer.end_of_text_id].astype(np.int32)
    expected = tokenizer.detokenize(kept).numpy().decode("utf-8")
    tracemalloc.start()
    try:
        counts = data._count_text(tokenizer, ids, chunk=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts == (len(expected), len(expected.encode("utf-8")))
    assert peak < 16 * (1 << 16) * 4, peak  # a few int32 copies and the text of one chunk


def test_resolve_text_files_expands_globs_and_directories(tmp_path):
    write(tmp_path / "b.txt", "b")
    os.makedirs(tmp_path / "sub" / ".hidden")
    write(tmp_path / "sub" / "a.txt", "a")
    write(tmp_path / "sub" / ".hidden" / "x.txt", "x")
    write(tmp_path / "sub" / ".notes", "x")
    assert data.resolve_text_files([str(tmp_path)]) == [
        str(tmp_path / "b.txt"), str(tmp_path / "sub" / "a.txt")
    ]
    assert data.resolve_text_files([str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]) == [
        str(tmp_path / "b.txt")
    ]


@pytest.mark.parametrize("name, match", [
    ("missing.txt", "missing.txt: no such file or directory"),
    ("*.md", r"\*.md: the pattern matches no file"),
    ("empty_dir", "empty_dir: the directory holds no text file"),
])
def test_resolve_text_files_errors(tmp_path, name, match):
    os.makedirs(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match=match):
        data.resolve_text_files([str(tmp_path / name)])


@pytest.fixture(scope="module")
def shakespeare_tokens(tmp_path_factory):
    tokenizer = CharTokenizer.train(data.read_text(SHAKESPEARE))
    directory = str(tmp_path_factory.mktemp("prepared") / "data")
    return tokenizer, data.prepare_tokens([SHAKESPEARE], tokenizer, directory)


def test_split_is_nanogpt_shakespeare_char(shakespeare_tokens):
    tokenizer, token_file = shakespeare_tokens
    assert (token_file.num_train, token_file.num_validation) == (1_003_854, 111_540)
    assert token_file.validation_chars == 111_540
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    tokens = token_file.tokens()
    assert tokenizer.detokenize(np.asarray(tokens[:200], np.int32)).numpy().decode() == text[:200]
    assert data.TokenFile.load(token_file.directory) == token_file


def test_training_windows_shift_by_one_and_depend_only_on_seed_and_step(shakespeare_tokens):
    _, token_file = shakespeare_tokens
    tokens = np.asarray(token_file.tokens()[: token_file.num_train])
    full = list(data.training_dataset(token_file, 32, 4, seed=7, start_step=0, num_steps=6))
    resumed = list(data.training_dataset(token_file, 32, 4, seed=7, start_step=4, num_steps=2))
    other_seed = next(iter(data.training_dataset(token_file, 32, 4, seed=8, start_step=0,
                                                 num_steps=1)))
    for (inputs, targets) in full:
        assert inputs.shape == targets.shape == (4, 32)
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        for row in np.asarray(inputs):  # every window is a real slice of the training split
            start = np.flatnonzero(np.all(
                np.lib.stride_tricks.sliding_window_view(tokens, 32)[:, :4] == row[:4], axis=1))
            assert any(np.array_equal(tokens[s : s + 32], row) for s in start)
    for (a, b), (c, d) in zip(full[4:], resumed):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert not np.array_equal(full[0][0], other_seed[0])


def test_validation_batches_are_fixed_and_from_the_validation_split(shakespeare_tokens):
    _, token_file = shakespeare_tokens
    first = [x.numpy() for x, _ in data.validation_dataset(token_file, 16, 3, 1, 2)]
    second = [x.numpy() for x, _ in data.validation_dataset(token_file, 16, 3, 1, 2)]
    np.testing.assert_array_equal(first, second)
    validation = np.asarray(token_file.tokens()[token_file.num_train :])
    windows = np.lib.stride_tricks.sliding_window_view(validation, 16)
    for row in first[0]:
        assert np.any(np.all(windows == row, axis=1))


def test_documents_are_joined_with_end_of_text(tmp_path):
    first = write(tmp_path / "1.txt", "ab\n" * 20)
    second = write(tmp_path / "2.txt", "cd\n" * 20)
    tokenizer = CharTokenizer.train("abcd\n")
    token_file = data.prepare_tokens([first, second], tokenizer, str(tmp_path / "data"))
    tokens = np.asarray(token_file.tokens())
    assert list(tokens == tokenizer.end_of_text_id).count(True) == 1
    assert tokens[60] == tokenizer.end_of_text_id  # right after the 60 characters of 1.txt
    assert token_file.num_train == int(121 * 0.9)


def test_separate_validation_files(tmp_path):
    train = write(tmp_path / "train.txt", "abc\n" * 30)
    validation = write(tmp_path / "val.txt", "cab\n" * 10)
    tokenizer = CharTokenizer.train("abc\n")
    token_file = data.prepare_tokens([train], tokenizer, str(tmp_path / "d"), [validation])
    assert (token_file.num_train, token_file.num_validation) == (120, 40)


def test_empty_file_and_short_corpus_are_rejected_and_nothing_is_left(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    tokenizer = CharTokenizer.train("ab")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        data.prepare_tokens([empty], tokenizer, str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]  # no temporary directory left behind
    short = write(tmp_path / "short.txt", "ab" * 40)
    token_file = data.prepare_tokens([short], tokenizer, str(tmp_path / "d"))
    with pytest.raises(ValueError, match="validation split has 8 tokens, fewer than one window "
                                         "of context_length \\+ 1 = 17"):
        data.check_windows(token_file, 16)
