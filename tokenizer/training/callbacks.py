"""Training callbacks for multi-process debugging.

``DistributedAudit`` records, on every rank, which samples it consumed (the ``__key__`` list of each batch
when the DataModule has ``return_keys=True``) and dumps the rank's full model state (all parameters AND
buffers, including non-persistent ones and the VQ codebook EMA statistics) when training ends, so that a
separate checker can prove that ranks read disjoint data and ended with identical weights. It also counts, through
a DDP communication hook, how many gradient elements DDP all-reduces in each batch, so the checker can prove that
each tokenizer gradient is reduced exactly once per step (and nothing else goes through DDP):

    --trainer.callbacks+=tokenizer.training.callbacks.DistributedAudit
    --trainer.callbacks.init_args.out_dir RUN_DIR/audit

Files, one set per rank and per ``fit`` call (a resumed run adds a new set, tagged by its first step):
``rank{R}-from{S}-keys.json`` ({"rank", "world_size", "start_step", "end_step", "batches": [[epoch, step,
[keys...]], ...], "ddp": {"managed_elements", "tokenizer_elements", "reduced_per_batch"}}) and
``rank{R}-from{S}-state.pt`` ({name: tensor} of ``named_parameters`` + ``named_buffers`` on CPU, plus
``"__global_step__"``).
"""

from __future__ import annotations

import hashlib
import os

import lightning.pytorch as pl
import torch

from ..atomic import torch_save, write_json


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of `module`, detached, on CPU."""
    out = {f"param:{n}": p.detach().cpu().clone() for n, p in module.named_parameters()}
    out.update({f"buffer:{n}": b.detach().cpu().clone() for n, b in module.named_buffers()})
    return out


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DistributedAudit(pl.Callback):
    """Per-rank record of consumed sample keys and of the final weights (see the module docstring)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self._batches: list = []
        self._start_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []
        self._start_step = int(trainer.global_step)
        self._ddp = None
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
            managed = [p for n, p in pl_module.named_parameters() if p.requires_grad and n not in ignored]
            tokenizer = getattr(pl_module, "tokenizer", pl_module)
            self._ddp = {"managed_elements": sum(p.numel() for p in managed),
                         "tokenizer_elements": sum(p.numel() for p in tokenizer.parameters() if p.requires_grad),
                         "reduced_per_batch": []}
            self._reduced = 0
            model.register_comm_hook(None, self._counting_allreduce)

    def _counting_allreduce(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._reduced += bucket.buffer().numel()  # host-side count of elements this bucket all-reduces
        return allreduce_hook(state, bucket)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        keys = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
        if keys is None:
            raise RuntimeError(
                "DistributedAudit needs batches (images, labels, keys): set data return_keys=True"
            )
        self._batches.append([int(trainer.current_epoch), int(trainer.global_step), [str(k) for k in keys]])
        self._reduced = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._ddp is not None:
            self._ddp["reduced_per_batch"].append(self._reduced)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        rank, start = trainer.global_rank, self._start_step
        prefix = os.path.join(self.out_dir, f"rank{rank}-from{start}")
        tensors = state_tensors(pl_module)
        torch_save({**tensors, "__global_step__": torch.tensor(trainer.global_step)}, prefix + "-state.pt")
        record = {
            "rank": rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "start_step": start,
            "end_step": int(trainer.global_step),
            "state_sha256": state_hash(tensors),
            "batches": self._batches,
            "ddp": self._ddp,
        }
        write_json(prefix + "-keys.json", record)


__all__ = ["DistributedAudit", "state_tensors", "state_hash"]
