"""torchtune route, run in its own environment (.venv-torchtune, made by 04_Finetuning/torchtune/setup.sh):
tokenizer conversion, single-device full and LoRA recipes, the distributed recipe on 2 CPU processes."""

import json
import os
import re
import subprocess

import pytest
from ftutil import ROOT

VENV = ROOT / ".venv-torchtune"
CONFIGS = ROOT / "04_Finetuning" / "torchtune"
pytestmark = pytest.mark.skipif(not (VENV / "bin" / "tune").exists(),
                                reason="no .venv-torchtune: create it with bash 04_Finetuning/torchtune/setup.sh")


def run(cmd: list[str], timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def losses(out_dir) -> list[float]:
    text = "".join(p.read_text() for p in (out_dir / "logs").glob("*.txt"))
    return [float(x) for x in re.findall(r"loss:([0-9.]+)", text)]


def test_tokenizer_matches_the_hf_tokenizer(chat_data, base_model):
    from transformers import AutoTokenizer

    text = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    script = ("import sys, json; from torchtune.models.llama3 import llama3_tokenizer as t; "
              f"tok = t('{chat_data}/tokenizer.model', special_tokens_path='{chat_data}/special_tokens.json'); "
              "print(json.dumps(tok.encode(sys.argv[1], add_bos=False, add_eos=False)))")
    out = run([str(VENV / "bin/python"), "-c", script, text])
    ids = json.loads(next(line for line in out.splitlines() if line.startswith("[")))
    assert ids == AutoTokenizer.from_pretrained(base_model)(text, add_special_tokens=False).input_ids
    added = json.loads((chat_data / "special_tokens.json").read_text())["added_tokens"]
    specials = {t["content"]: t["id"] for t in added}
    assert max(specials.values()) < 4096 and specials["<|eot_id|>"] == specials["<|end_of_text|>"] == 0


@pytest.mark.parametrize("recipe,config", [("full_finetune_single_device", "full_single_device.yaml"),
                                           ("lora_finetune_single_device", "lora_single_device.yaml")])
def test_single_device_recipe(recipe, config, chat_data, base_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run([str(VENV / "bin/tune"), "run", recipe, "--config", str(CONFIGS / config), f"model_dir={base_model}",
         f"data_dir={chat_data}", f"output_dir={out}", "max_steps_per_epoch=4", "batch_size=4"])
    seen = losses(out)
    assert len(seen) == 4 and all(0 < x < 20 for x in seen), seen
    model = AutoModelForCausalLM.from_pretrained(out / "epoch_0", local_files_only=True)  # HF format back
    assert model.config.num_hidden_layers == 4


def test_distributed_recipe_on_two_cpu_processes(chat_data, base_model, tmp_path):
    out = tmp_path / "dist"
    log = run([str(VENV / "bin/python"), str(CONFIGS / "launch_distributed.py"), "--nproc", "2", "--config",
               str(CONFIGS / "full_distributed.yaml"), f"model_dir={base_model}", f"data_dir={chat_data}",
               f"output_dir={out}", "max_steps_per_epoch=3", "batch_size=2"])
    for rank in (0, 1):  # both processes ran the (patched) recipe
        assert f"launch_distributed: rank {rank}/2 on CPU" in log, log[-2000:]
    assert "Distributed training is enabled" in log
    assert len(losses(out)) == 3 and (out / "epoch_0" / "config.json").exists()
