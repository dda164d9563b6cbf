"""Instruction data from the plays: parsing, deterministic split, prompt masking, metric, hub formats."""

import pytest
from ftutil import load_chapter

sd = load_chapter("sft_data")


@pytest.fixture(scope="module")
def data():
    return sd.shakespeare_sft(plays=["hamlet", "macbeth", "the-tempest"])


def test_parse_scenes_keeps_speakers_and_speeches():
    text = ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[Enter BERNARDO]\n\nBERNARDO:\nWho's there?\n\n"
            "FRANCISCO:\nNay, answer me: stand,\nand unfold yourself.\n\nSCENE II. A room.\n\nFIRST WITCH:\nHail!\n")
    scenes = sd.parse_scenes(text)
    assert scenes == [[("BERNARDO", "Who's there?"), ("FRANCISCO", "Nay, answer me: stand,\nand unfold yourself.")],
                      [("FIRST WITCH", "Hail!")]]


def test_examples_split_is_deterministic_and_by_scene(data):
    again = sd.shakespeare_sft(plays=["hamlet", "macbeth", "the-tempest"])
    assert [e.messages for e in again["val"]] == [e.messages for e in data["val"]]
    n_train, n_val = len(data["train"]), len(data["val"])
    assert n_train > 3000 and 0.01 < n_val / (n_train + n_val) < 0.12
    assert {e.task for e in data["train"]} == {"speaker", "next"}
    titles = {e.answer.split(", in ")[1] for e in data["train"] if e.task == "speaker"}
    assert titles == {"Hamlet", "Macbeth", "The Tempest"}
    # no validation question is also a training question (the split is by scene)
    train_q = {e.messages[-2]["content"] for e in data["train"] if e.task == "next"}
    assert not train_q & {e.messages[-2]["content"] for e in data["val"] if e.task == "next"}
    assert sd.in_validation("Hamlet/3", 5.0) == sd.in_validation("Hamlet/3", 5.0)


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(data_dir):
    from transformers import PreTrainedTokenizerFast

    from common.data import EOT, prepare

    d = prepare("shakespeare", data_dir, "bpe", 4096, progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d.dir / "tokenizer.json"), eos_token=EOT)
    sd.ensure_chat_template(tok)
    assert tok.chat_template == sd.CHAT_TEMPLATE and tok.pad_token == EOT
    ex = sd.Example(sd._chat("Who speaks next?", "HORATIO"), "next")
    ids, labels = sd.tokenize(tok, ex, max_len=256)
    assert len(ids) == len(labels)
    n_prompt = labels.count(sd.IGNORE)
    assert labels[:n_prompt] == [sd.IGNORE] * n_prompt and sd.IGNORE not in labels[n_prompt:]
    assert tok.decode(labels[n_prompt:]).rstrip("\n") == "HORATIO" + EOT
    assert tok.decode(ids[:n_prompt]).endswith("<|assistant|>\n") and "Who speaks next?" in tok.decode(ids)
    short_ids, short_labels = sd.tokenize(tok, ex, max_len=6)  # the prompt is cut, never the answer
    assert short_labels[-len(labels[n_prompt:]):] == labels[n_prompt:] and len(short_ids) == 6


def test_exact_match():
    assert sd.exact_match([" Horatio ", "HAMLET, in  Hamlet", "x"], ["HORATIO", "hamlet, in hamlet", "y"]) == 2 / 3
    assert sd.exact_match([], []) == 0.0


def test_hub_rows_in_chat_and_alpaca_format():
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert sd._row_to_messages(chat)[-1] == {"role": "assistant", "content": "Hello"}
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert sd._row_to_messages(alpaca) == [{"role": "user", "content": "Add\n\n2 and 3"},
                                           {"role": "assistant", "content": "5"}]
    assert sd._row_to_messages({"messages": [{"role": "user", "content": "unanswered"}]}) is None
    with pytest.raises(ValueError, match="need 'messages'"):
        sd._row_to_messages({"text": "plain"})
    with pytest.raises(ValueError, match="must be 'shakespeare' or hf:"):
        sd.load_sft("nonsense")
