"""Train a tokenizer (or, with a generator config, the AR generator) with Lightning.

One GPU / CPU:
    python train.py fit --config configs/tokenizer/tiny.yaml
    python train.py fit --config configs/tokenizer/tiny.yaml --trainer.max_steps 2000
Resume after a crash or preemption (the newest `last.ckpt` of the run):
    python train.py fit --config configs/tokenizer/tiny.yaml --ckpt_path last
8 GPUs on one node:
    python train.py fit --config configs/tokenizer/onedpiece-B-256.yaml --trainer.devices 8
N nodes (torchrun on every node, or SLURM's srun which Lightning detects):
    torchrun --nnodes N --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        train.py fit --config CONFIG --trainer.num_nodes N --trainer.devices 8

Outputs go to checkpoints/<run>/: config.yaml (the resolved config, written once a resume has restored; earlier
versions that differ are kept as config.1.yaml, ...), checkpoints (written atomically), TensorBoard logs, and,
when training ends, tokenizer/ (save_pretrained of the EMA weights when EMA is on). `--ckpt_path last` resumes
from the newest checkpoint that loads, and refuses a checkpoint whose architecture differs from the config's
(tokenizer/training/cli.py); on a finished run it trains nothing and writes tokenizer/ again if that export is
missing or incomplete (a full disk at the end of the run; tokenizer/training/export.py).

Expected errors (a full disk, a bad config value, an unreadable checkpoint, a diverged training) end the command
with one line, `train.py: error: ...`, and status 1; ONEDTOK_DEBUG=1 shows the traceback (tokenizer/errors.py).
"""

from __future__ import annotations

import os
import sys
import warnings

# `data` and `eval` are repo-local packages: make them importable whatever the working directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tokenizer.errors import run_command  # noqa: E402
from tokenizer.training.cli import main  # noqa: E402
from tokenizer.training.divergence import TrainingDiverged  # noqa: E402

# Expected here, not problems: checkpoints hold the post-step state (what we want), and the EMA copy of the
# tokenizer lives in eval mode on purpose.
warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


if __name__ == "__main__":
    run_command("train.py", main, also=(TrainingDiverged,))
