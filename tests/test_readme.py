"""The README's two quick-start commands exist as written, CI runs the second, and the first really trains."""

import json
import os
import re
import subprocess

import pytest
from testutil import ROOT


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_two_commands_and_ci_runs_the_test_command():
    cmds = quickstart_commands()
    assert cmds == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    for cmd in cmds:
        assert (ROOT / cmd.split()[1]).is_file()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert cmds[1] in ci  # .ci/run calls exactly the README's test command


def test_quickstart_trains_with_ddp(tmp_path, data_dir):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv here: scripts/test.sh creates it (run the suite through it)")
    proc = subprocess.run(["bash", "scripts/quickstart.sh", "--max-steps", "8", "--log-interval", "4",
                           "--sample-tokens", "0", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "qs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["strategy"] == "ddp" and summary["steps"] == 8
    assert summary["world_size"] == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    assert summary["losses"][-1] < summary["losses"][0]


def test_agenda_times_add_up():
    """The landing page's agenda: consecutive slots from 0:00 to the length its heading announces."""
    readme = (ROOT / "README.md").read_text()
    heading = re.search(r"## Agenda \((\d+) h (\d+) min\)", readme)
    assert heading, "README.md has an '## Agenda (H h M min)' section"
    total = int(heading[1]) * 60 + int(heading[2])
    section = readme.split(heading[0], 1)[1].split("\n## ", 1)[0]
    slots = [(int(a) * 60 + int(b), int(c) * 60 + int(d))
             for a, b, c, d in re.findall(r"^\| [^|]* \| (\d):(\d\d)–(\d):(\d\d) \|", section, re.M)]  # fmt: skip
    assert len(slots) >= 8, slots
    assert slots[0][0] == 0 and slots[-1][1] == total, (slots, total)
    for (_, end), (start, _) in zip(slots, slots[1:]):
        assert end == start, f"gap or overlap at {end} min"
    assert 210 <= total <= 240, "a 3.5-4 hour tutorial"
