"""The launch flags the documentation tells users to pass, read from the documents themselves, so that the tests
run exactly what users run and the docs cannot drift from what is tested."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DOCS = (ROOT / "scripts" / "slurm_train.sbatch", ROOT / "docs" / "multinode.md")


def documented_strategy() -> str:
    """The one value of `--trainer.strategy` in every multi-GPU command of the SLURM script and the docs."""
    found = {}
    for path in LAUNCH_DOCS:
        for value in re.findall(r"--trainer\.strategy[ =]+(\S+)", path.read_text()):
            found.setdefault(value, []).append(path.name)
    if len(found) != 1:
        raise AssertionError(f"the launch docs disagree on --trainer.strategy (or name none): {found}")
    return next(iter(found))
