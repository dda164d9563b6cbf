"""Run several chapter-03 trainings in one ``torchrun`` launch (each launch costs 15-25 s on CI).

    torchrun --standalone --nproc_per_node=2 tests/parallel_driver.py JOBS.json

JOBS.json is a list of {"script": "pp" | "zero", "config": {TrainConfig fields, the script's own fields too},
"rewind_to": step, "nan_at_step": step, "nan_loss_at_step": step (each optional)}. Each job's summary lands in
its config's out_dir (rank 0 writes it). ``rewind_to`` first trains with the job's config (checkpointing on
the way), then points ``latest`` at the checkpoint of that step and trains again with ``resume=True``: the
second summary goes to ``<out_dir>/resumed.json``. ``nan_at_step`` makes rank 0's output NaN in that step (a
loss spike, ``testutil.nan_at_step``); ``nan_loss_at_step`` only its reported loss, the gradients stay finite:
rank 0 writes the UserError that stops the run (or "no error") to ``<out_dir>/error.txt`` and the next job
runs. Jobs run in order on every rank; one process group serves them all.
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from testutil import load_script, nan_at_step  # noqa: E402

from common import distributed  # noqa: E402
from common.config import TrainConfig, make_config  # noqa: E402
from common.errors import UserError  # noqa: E402


def run_job(job: dict) -> None:
    module = load_script(f"03_LLM_Training_on_GPU/{job['script']}.py")
    cls = getattr(module, "Config", TrainConfig)
    cfg = make_config(cls, **job["config"])
    if "nan_loss_at_step" in job:  # expected to stop: record how
        try:
            with nan_at_step(job["nan_loss_at_step"], where="loss"):
                module.main(cfg)
            message = "no error"
        except UserError as e:
            message = str(e)
        if dist.get_rank() == 0:
            (Path(cfg.out_dir) / "error.txt").write_text(message)
        return
    with nan_at_step(job["nan_at_step"]) if "nan_at_step" in job else nullcontext():
        summary = module.main(cfg)
    if "rewind_to" in job:
        if dist.get_rank() == 0:
            (Path(cfg.out_dir) / "checkpoints" / "latest").write_text(f"step_{job['rewind_to']:06d}")
        dist.barrier()
        summary = module.main(make_config(cls, **{**job["config"], "resume": True}))
        if dist.get_rank() == 0:
            (Path(cfg.out_dir) / "resumed.json").write_text(json.dumps(summary))


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for job in jobs:
        run_job(job)
    distributed.teardown()


if __name__ == "__main__":
    main()
