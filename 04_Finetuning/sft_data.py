"""Instruction data for supervised fine-tuning (SFT), made from the plays we pretrained on — or from the hub.

Offline, fine-tuning needs a goal it can measure. The plays in ``common.data`` mark every speech with
its speaker, so questions with one right answer come for free:

- ``speaker``: "Who speaks these lines, and in which play?"  ->  "HORATIO, in Hamlet"
- ``next``:    the last three speeches of a scene, "Who speaks next?"  ->  "BERNARDO"

Each example is a chat (a list of ``{"role", "content"}`` messages, the last one the assistant's answer),
so the same code path serves a hub dataset. Train/validation split is by scene (a hash of play + scene
number), so no validation speech ever appears in a training prompt, and it does not depend on order,
on ``max_examples`` or on the machine. The metric is exact match of the generated answer (after
trimming and case folding).

Hub data on a cluster (fetch once on the login node with ``04_Finetuning/prefetch.py``, then run with
``HF_HUB_OFFLINE=1``): ``--data hf:NAME[:CONFIG]`` reads a dataset with a ``messages`` column (chat
format, e.g. ``HuggingFaceH4/no_robots``) or Alpaca-style ``instruction``/``input``/``output`` columns
(e.g. ``tatsu-lab/alpaca``). Its ``test`` split is the validation set when it has one, else every 20th row.

    python 04_Finetuning/sft_data.py            # counts and a few examples
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

IGNORE = -100  # label of tokens that do not count in the loss (the prompt, the padding)

# A minimal chat template for tokenizers that have none (our locally trained BPE). Role markers are
# plain text, so no new tokens (and no embedding resize) are needed; the answer ends with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM = "You answer questions about Shakespeare's plays with a name only."
TASKS = ("speaker", "next")


@dataclass
class Example:
    messages: list[dict]  # the chat; the last message is the assistant's answer
    task: str  # speaker, next, or hub

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


# ----------------------------------------------------------------------------- the plays
_NAME = re.compile(r"[^\[\]a-z]{2,40}:")  # 'HAMLET:', 'FIRST WITCH:' (no lower case letters)


def parse_scenes(text: str) -> list[list[tuple[str, str]]]:
    """A cleaned play (``common.data.clean_play``) -> scenes, each a list of (SPEAKER, speech)."""
    scenes: list[list[tuple[str, str]]] = [[]]
    speaker, lines = None, []

    def flush():
        nonlocal speaker, lines
        if speaker and lines:
            scenes[-1].append((speaker, "\n".join(lines)))
        speaker, lines = None, []

    for line in text.splitlines()[1:]:  # line 0 is the title
        if line.startswith(("ACT ", "SCENE ")):
            flush()
            if scenes[-1]:
                scenes.append([])
        elif _NAME.fullmatch(line):
            flush()
            speaker = line[:-1].strip()
        elif not line or line.startswith("["):
            flush() if not line else None
        elif speaker:
            lines.append(line)
    flush()
    return [s for s in scenes if s]


def _clip(speech: str, max_chars: int) -> str:
    return speech if len(speech) <= max_chars else speech[:max_chars].rsplit(" ", 1)[0] + " ..."


def play_examples(title: str, scenes, tasks=TASKS, max_chars: int = 160):
    """Yield (scene key, Example) for one play."""
    for si, scene in enumerate(scenes):
        key = f"{title}/{si}"
        for i, (speaker, speech) in enumerate(scene):
            if "speaker" in tasks:
                q = f"Who speaks these lines, and in which play?\n\n{_clip(speech, max_chars)}"
                yield key, Example(_chat(q, f"{speaker}, in {title}"), "speaker")
            if "next" in tasks and i >= 3:
                context = "\n\n".join(f"{s}:\n{_clip(t, max_chars // 2)}" for s, t in scene[i - 3 : i])
                yield key, Example(_chat(f"{context}\n\nWho speaks next?", speaker), "next")


def _chat(question: str, answer: str, system: str | None = SYSTEM) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def in_validation(key: str, val_percent: float) -> bool:
    """Deterministic split: a stable hash of the scene key (not Python's salted hash)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10000 < val_percent * 100


def shakespeare_sft(tasks=TASKS, val_percent: float = 5.0, plays: list[str] | None = None,
                    seed: int = 0) -> dict[str, list[Example]]:
    """{"train": [...], "val": [...]} from the plays (optionally only the given play file stems)."""
    from common.data import shakespeare_plays

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown SFT task(s) {sorted(unknown)}; choose from {TASKS}")
    out: dict[str, list[Example]] = {"train": [], "val": []}
    for stem, text in shakespeare_plays().items():
        if plays and stem not in plays:
            continue
        title = text.splitlines()[0].strip()
        for key, ex in play_examples(title, parse_scenes(text), tasks):
            out["val" if in_validation(key, val_percent) else "train"].append(ex)
    for split, rows in out.items():  # one fixed shuffle, so that a prefix is a fair sample
        random.Random(f"{seed}-{split}").shuffle(rows)
    return out


# ----------------------------------------------------------------------------- hub datasets
def _row_to_messages(row: dict) -> list[dict] | None:
    if "messages" in row:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return msgs if msgs and msgs[-1]["role"] == "assistant" else None
    if "instruction" in row and "output" in row:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return _chat(user, row["output"], system=None)
    raise ValueError(f"cannot read an SFT example from columns {sorted(row)}: need 'messages' or "
                     "'instruction'/'input'/'output'")


def hub_sft(name: str, config: str | None = None) -> dict[str, list[Example]]:
    """A hub dataset in chat or Alpaca format (from the local cache when HF_HUB_OFFLINE=1)."""
    from datasets import load_dataset

    ds = load_dataset(name, config)
    train_name = "train" if "train" in ds else next(iter(ds))
    test_name = next((s for s in ("test", "validation", "test_sft") if s in ds), None)
    rows = [m for r in ds[train_name] if (m := _row_to_messages(r))]
    if test_name:
        val = [m for r in ds[test_name] if (m := _row_to_messages(r))]
    else:
        rows, val = [m for i, m in enumerate(rows) if i % 20], [m for i, m in enumerate(rows) if i % 20 == 0]
    return {"train": [Example(m, "hub") for m in rows], "val": [Example(m, "hub") for m in val]}


def load_sft(data: str = "shakespeare", tasks=TASKS, seed: int = 0) -> dict[str, list[Example]]:
    """``shakespeare`` (offline, from the plays) or ``hf:NAME[:CONFIG]``."""
    if data == "shakespeare":
        return shakespeare_sft(tasks, seed=seed)
    if data.startswith("hf:"):
        name, _, config = data[3:].partition(":")
        return hub_sft(name, config or None)
    raise ValueError(f"--data must be 'shakespeare' or hf:NAME[:CONFIG], not {data!r}")


# ----------------------------------------------------------------------------- tokens and metric
def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without one (ours) the minimal template above; hub chat models keep theirs."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prompt_text(tokenizer, ex: Example) -> str:
    return tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)


def tokenize(tokenizer, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt's labels are IGNORE, so only the answer (and EOS) is learned.

    Prompt and answer are tokenized separately and concatenated, so the boundary is exact for any
    tokenizer. Too long examples lose the start of the prompt, never the answer.
    """
    prompt = prompt_text(tokenizer, ex)
    full = tokenizer.apply_chat_template(ex.messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    a = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
    ids, labels = p + a, [IGNORE] * len(p) + a
    return ids[-max_len:], labels[-max_len:]


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to the answer after trimming, case folding and joining spaces."""
    if not answers:
        return 0.0
    return sum(normalize(p) == normalize(a) for p, a in zip(predictions, answers)) / len(answers)


if __name__ == "__main__":
    data = shakespeare_sft()
    for split, rows in data.items():
        by_task = {t: sum(r.task == t for r in rows) for t in TASKS}
        print(f"{split}: {len(rows)} examples {by_task}")
    for ex in data["val"][:3]:
        print("-" * 60, *(f"[{m['role']}] {m['content']}" for m in ex.messages), sep="\n")
