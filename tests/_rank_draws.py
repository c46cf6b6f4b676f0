"""Run under torchrun (one process per rank, gloo on CPU): short DDP fits of both stages, recording the random
draws of every training step on this rank, into OUT_DIR/rank{R}.pt:

    {"tail_token_drop": [steps, B] keep lengths (one k per batch), "nested_dropout": [steps, B] keep lengths,
     "dropout": [steps, ...] bool, where the generator's first residual dropout zeroed an activation}

    python -m torch.distributed.run --nproc_per_node 2 -m _rank_draws OUT_DIR    (PYTHONPATH: the repo and tests/)
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from _small_training import QUIET, SMALL, fixed_batches
from torch.utils.data import DataLoader, TensorDataset

from tokenizer.generator.lightning import GeneratorModule
from tokenizer.training import TokenizerModule

STEPS = 3


def ddp_fit(module: pl.LightningModule, loader: DataLoader) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy="ddp", max_steps=STEPS,
                         limit_val_batches=0, log_every_n_steps=1, **QUIET)  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)


def tokenizer_lengths(mechanism: str) -> torch.Tensor:
    """[steps, B]: the keep lengths the tokenizer trained with at each step."""
    pl.seed_everything(0)
    module = TokenizerModule(preset="tiny", overrides={**SMALL, "length_mechanism": mechanism}, warmup_steps=1)
    lengths = []
    module.tokenizer.register_forward_hook(lambda m, args, out: lengths.append(out.lengths.clone()))
    ddp_fit(module, fixed_batches(2 * STEPS))
    return torch.stack(lengths)


def generator_dropout() -> torch.Tensor:
    """[steps, ...]: where the first residual dropout of the GPT zeroed an activation, at each step."""
    pl.seed_everything(0)
    module = GeneratorModule(preset="tiny", overrides={"vocab_size": 32, "max_tokens": 16, "num_classes": 4,
                                                       "dropout": 0.5, "class_dropout_prob": 0.5},
                             tokenizer_dir=None, num_val_samples=0, warmup_steps=1)  # fmt: skip
    masks = []
    dropout = next(m for m in module.gpt.modules() if isinstance(m, torch.nn.Dropout))
    dropout.register_forward_hook(lambda m, args, out: masks.append(out == 0))
    g = torch.Generator().manual_seed(0)
    n = 2 * STEPS * 4
    ids, labels = torch.randint(0, 32, (n, 16), generator=g), torch.randint(0, 4, (n,), generator=g)
    ddp_fit(module, DataLoader(TensorDataset(ids, labels), batch_size=4))
    return torch.stack(masks)


if __name__ == "__main__":
    torch.set_num_threads(1)
    record = {mechanism: tokenizer_lengths(mechanism) for mechanism in ("tail_token_drop", "nested_dropout")}
    record["dropout"] = generator_dropout()
    torch.save(record, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
