"""The BPE merge loop in plain Python: the reference, and the fallback when no C++ compiler is present.

Input is what a pre-tokenizer produced: each distinct word as a list of token ids, with how often it occurs.
Each round counts every adjacent pair (weighted by the word's count), merges the most frequent pair
everywhere, and records ``(left id, right id, new id)``. Ties go to the smallest ``(left, right)``
pair, as in Hugging Face ``tokenizers``; if the merged string is already in the vocabulary its id is
reused. Training stops when the vocabulary reaches ``vocab_size`` or no pair is left.
"""

from __future__ import annotations

from collections import Counter


def merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, by ``new``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_merges(words: list[list[int]], counts: list[int], vocab: list[str],
                 vocab_size: int) -> list[tuple[int, int, int]]:
    """Learn merges until the vocabulary has ``vocab_size`` entries; ``vocab[i]`` is the string of id i."""
    words = [list(w) for w in words]
    vocab = list(vocab)
    index = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    while len(index) < vocab_size:
        pairs: Counter = Counter()
        for word, n in zip(words, counts):
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        token = vocab[a] + vocab[b]
        new = index.get(token)
        if new is None:
            new = index[token] = len(vocab)
            vocab.append(token)
        merges.append((a, b, new))
        words = [merge_word(w, a, b, new) if len(w) > 1 else w for w in words]
    return merges
