"""ddp.py with an injected fault, for the restart test: on the first attempt (torchrun restart count 0)
rank 1 kills itself with SIGKILL when it fetches the batch of step KILL_AT (0-based); the elastic agent
then restarts both ranks (--max-restarts), which must resume from the latest checkpoint by themselves.

    torchrun --max-restarts 1 --nproc_per_node=2 tests/fault_driver.py KILL_AT [ddp.py flags]
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testutil import load_script  # noqa: E402

from common import data  # noqa: E402
from common.trainer import run_main  # noqa: E402

kill_at = int(sys.argv.pop(1))
original = data.Sampler.batch


def batch(self, step, *args):
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if step == kill_at and first_attempt and os.environ.get("RANK") == "1" and len(self.tokens) > 1_000_000:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step, *args)


data.Sampler.batch = batch
ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
run_main(ddp.main, "ddp with a fault")
