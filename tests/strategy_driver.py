"""Run several chapter-03 trainings one after another inside ONE torchrun launch (one process group).

Each ``torchrun`` launch costs 15-25 s on the CI machine; the sharded-strategy tests batch their runs
here instead. Usage (what tests/test_sharded.py does)::

    torchrun --standalone --nproc_per_node=2 tests/strategy_driver.py PLAN.json RESULTS_DIR

PLAN.json is a list of steps, executed in order on every rank:
- ``{"name": "fsdp", "script": "03_LLM_Training_on_GPU/fsdp.py", "config": {...}}``: ``main(make_config(**config))``;
  rank 0 copies the run's summary.json to RESULTS_DIR/<name>.json;
  with ``"nan_at_step": k`` rank 0's output is NaN in step k (``testutil.nan_at_step``: a loss spike);
- ``{"rewind": OUT_DIR, "to": "step_000005"}``: point OUT_DIR's ``latest`` checkpoint at an earlier step.
"""

import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testutil import load_script, nan_at_step  # noqa: E402

from common import distributed  # noqa: E402
from common.config import TrainConfig, make_config  # noqa: E402


def main(plan_file: str, results: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    rank, _, _, _ = distributed.env_ranks()
    scripts = {}
    for step in plan:
        if "rewind" in step:
            if rank == 0:
                (Path(step["rewind"]) / "checkpoints" / "latest").write_text(step["to"])
        else:
            if step["script"] not in scripts:
                scripts[step["script"]] = load_script(step["script"])
            module = scripts[step["script"]]
            cfg = make_config(getattr(module, "Config", TrainConfig), **step["config"])
            t0 = time.perf_counter()
            with nan_at_step(step["nan_at_step"]) if "nan_at_step" in step else nullcontext():
                module.main(cfg)
            if rank == 0:
                print(f"driver: {step['name']} took {time.perf_counter() - t0:.1f} s", flush=True)
                shutil.copy(Path(cfg.out_dir) / "summary.json", Path(results) / f"{step['name']}.json")
        if dist.is_initialized():
            dist.barrier()
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
