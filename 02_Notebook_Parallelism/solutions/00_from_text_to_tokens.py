"""Solution to the exercise of ``00_from_text_to_tokens.ipynb``: one BPE merge step on token ids.

``tests/test_notebooks.py`` runs the notebook's check cell against the stub (it must fail) and against this
file (it must pass).
"""

from collections import Counter


def bpe_step(words: list[list[int]], counts: list[int], new_id: int) -> tuple[tuple[int, int], list[list[int]]]:
    # one merge: returns the most frequent adjacent pair and the words with that pair replaced by new_id
    pairs: Counter = Counter()
    for word, n in zip(words, counts):
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    # the highest count; among equal counts the smallest (left, right), hence the minus signs
    (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
    merged = []
    for word in words:
        out, i = [], 0
        while i < len(word):
            if word[i : i + 2] == [a, b]:  # left to right: "aaa" with (a, a) becomes [new, a]
                out.append(new_id)
                i += 2
            else:
                out.append(word[i])
                i += 1
        merged.append(out)
    return (a, b), merged
