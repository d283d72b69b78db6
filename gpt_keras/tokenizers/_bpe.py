"""Byte-level BPE machinery: the word-splitting rule, the in-graph merge engine and the trainer.

The engine is independent of where the merges come from: `apply_merges` takes a rank table and the
id each merge produces, so GPT-2's `encoder.json`/`vocab.bpe` can drive it too (after mapping bytes
to GPT-2's base ids with a `tf.gather`).
"""

import collections
import heapq

import regex
import tensorflow as tf

# Characters that form whitespace words. Written out because `\s` means ASCII whitespace in RE2 and
# Unicode whitespace in Python; both engines read this class the same way.
_WHITESPACE = r"\t\n\v\f\r\x1c-\x1f\x85\p{Z}"

# GPT-2's pre-tokenization regex without its one lookahead (`\s+(?!\S)`, which gives the last space
# of a whitespace run to the next word), since RE2 has none: here "a  b" splits as "a", "  ", "b"
# where GPT-2 gives "a", " ", " b". Valid, with the same meaning, in RE2 and in Python's `regex`.
# It matches every character, so the words of a text concatenate back to the text.
PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d"  # English contractions
    r"| ?\p{L}+| ?\p{N}+"  # letters, digits: each run with an optional leading space
    rf"| ?[^{_WHITESPACE}\p{{L}}\p{{N}}]+"  # anything else, with an optional leading space
    rf"|[{_WHITESPACE}]+"  # whitespace runs
)

# Inserted before every word to split on; 0xFF never occurs in valid UTF-8.
_MARK = b"\xff"
# Rank of a pair that has no merge; larger than any real rank.
NO_MERGE = 2**31 - 1


def split_words(strings, pattern):
    """`[B]` strings → `[B, None]` words: the successive matches of `pattern` (RE2 syntax), which
    must match every character. Invalid UTF-8 is first replaced by U+FFFD."""
    strings = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace")
    marked = tf.strings.regex_replace(strings, pattern, _MARK + b"\\0")
    return tf.strings.split(marked, _MARK)[:, 1:]  # drop the empty string before the first mark


def string_bytes(strings):
    """`[N]` strings → int32 ragged `[N, None]`: the bytes of each string, 0..255."""
    flat = tf.io.decode_raw(tf.strings.reduce_join(strings), tf.uint8)  # all bytes, [total]
    return tf.RaggedTensor.from_row_lengths(
        tf.cast(flat, tf.int32), tf.cast(tf.strings.length(strings), tf.int64)
    )


def apply_merges(tokens, ranks, merged_ids, key_base):
    """Applies BPE merges to each row of `tokens`, int32 ragged `[N, None]` → `[N, None]`.

    As GPT-2's `bpe()` does per word: repeatedly find the adjacent pair with the lowest rank in a
    row and merge every occurrence of it, left to right, until no adjacent pair has a merge. Rows
    are processed together; the loop runs as often as the row that needs the most merges.

    Args:
        tokens: int32 ragged `[N, None]` token ids (one row per word).
        ranks: a lookup table, int64 key `left * key_base + right` → int32 rank, with default
            `NO_MERGE` for pairs that do not merge.
        merged_ids: int32 `[M]`: the id of the token that merge rank `r` produces.
        key_base: an int larger than every token id.
    """
    nrows = tokens.nrows()

    def merge_best_pairs(values, row_ids, done):
        # values [L] ids of all rows laid end to end, row_ids [L]; pairs are (i, i + 1), [L - 1]
        pair_rows = row_ids[:-1]
        keys = tf.cast(values[:-1], tf.int64) * key_base + tf.cast(values[1:], tf.int64)
        pair_ranks = tf.where(pair_rows == row_ids[1:], ranks.lookup(keys), NO_MERGE)
        best = tf.math.unsorted_segment_min(pair_ranks, pair_rows, nrows)  # [N]
        is_best = tf.logical_and(pair_ranks == tf.gather(best, pair_rows), pair_ranks < NO_MERGE)
        # Consecutive best pairs overlap ("x x x" for a merge of "x x"): take the 1st, 3rd, ... of
        # each run, as a left-to-right scan would. offset = position within the run, from 1.
        matched = tf.cast(is_best, tf.int32)
        matched_so_far = tf.cumsum(matched)
        gaps_so_far = tf.cumsum(1 - matched)
        at_gaps = tf.concat([[0], tf.boolean_mask(matched_so_far, ~is_best)], 0)
        offset = matched_so_far - tf.gather(at_gaps, gaps_so_far)
        merge = tf.logical_and(is_best, offset % 2 == 1)  # [L - 1]: pair i becomes one token
        values = tf.tensor_scatter_nd_update(
            values, tf.where(merge), tf.gather(merged_ids, tf.boolean_mask(pair_ranks, merge))
        )
        keep = tf.concat([[True], ~merge], 0)  # drop the right half of each merged pair
        return (
            tf.boolean_mask(values, keep),
            tf.boolean_mask(row_ids, keep),
            tf.logical_not(tf.reduce_any(merge)),
        )

    values, row_ids, _ = tf.while_loop(
        lambda values, row_ids, done: tf.logical_not(done),
        merge_best_pairs,
        (tokens.flat_values, tokens.value_rowids(), tf.equal(tf.size(tokens.flat_values), 0)),
        shape_invariants=(tf.TensorShape([None]), tf.TensorShape([None]), tf.TensorShape([])),
    )
    return tf.RaggedTensor.from_value_rowids(values, row_ids, nrows)


def count_words(chunks, pattern):
    """Counts the words (matches of `pattern`) of the text the `str` `chunks` concatenate to.

    The last two words of each chunk are carried into the next one: a chunk can end inside a word,
    or inside a contraction whose failed match shortened the word before it.
    """
    compiled = regex.compile(pattern)
    counts = collections.Counter()
    carry = ""
    for chunk in chunks:
        words = compiled.findall(carry + chunk)
        counts.update(words[:-2])
        carry = "".join(words[-2:])
    counts.update(compiled.findall(carry))
    return counts


def train_merges(word_counts, num_merges):
    """Learns up to `num_merges` merges from `word_counts` (word `str` → count), as a list of
    `(left, right)` id pairs; merge `r` creates id `256 + r`. Words start as their UTF-8 bytes.

    Each step merges the most frequent adjacent pair (ties: the smallest `(left, right)`) in every
    word, updating the pair counts of only the words that contain it. Stops early when no pair
    occurs twice.
    """
    words = [list(word.encode("utf-8")) for word in word_counts]
    frequencies = list(word_counts.values())
    pair_counts = collections.Counter()
    pair_words = collections.defaultdict(set)  # pair → indices of words that may contain it
    for index, (word, frequency) in enumerate(zip(words, frequencies)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += frequency
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]  # stale entries are skipped
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts[pair] != -negative_count:
            continue
        if -negative_count < 2:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = set()
        for index in pair_words.pop(pair):
            word, frequency = words[index], frequencies[index]
            merged = _merge_pair(word, pair, new_id)
            if len(merged) == len(word):
                continue
            for old in zip(word, word[1:]):
                pair_counts[old] -= frequency
                changed.add(old)
            for new in zip(merged, merged[1:]):
                pair_counts[new] += frequency
                pair_words[new].add(index)
                changed.add(new)
            words[index] = merged
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return merges


def _merge_pair(word, pair, new_id):
    """`word` (a list of ids) with each `pair`, scanning left to right, replaced by `new_id`."""
    left, right = pair
    merged = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(new_id)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
