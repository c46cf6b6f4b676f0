"""Training callbacks for multi-process debugging.

``DistributedAudit`` records, on every rank, which samples it consumed (the ``__key__`` list of each batch
when the DataModule has ``return_keys=True``) and dumps the rank's full model state (all parameters AND
buffers, including non-persistent ones and the VQ codebook EMA statistics) when training ends, so that a
separate checker can prove that ranks read disjoint data and ended with identical weights. It also counts what
is all-reduced in each batch, so the checker can prove that each tokenizer gradient is reduced exactly once per
step, by DDP, and nothing else goes through DDP:

- through a DDP communication hook, the gradient elements DDP all-reduces;
- by wrapping ``torch.distributed.all_reduce`` for the duration of the fit (restored when training ends, also on
  an exception), every all-reduce made outside DDP: by the project (``dist.all_reduce`` in tokenizer/distributed.py,
  the codebook's EMA statistics, LeCam, the discriminator's gradients), by Lightning, or by anyone. One of them is
  a tokenizer gradient when its tensor shares storage with a tokenizer parameter's ``.grad``, or holds bit-identical
  copies of the gradients in parameter order (the flat buffer of ``average_gradients``); the rest is "other",
  recorded for information. Calls that bound the function before the fit (``from torch.distributed import
  all_reduce``) are not seen. The copy test reads values on the host: this callback is for audits, not for speed.

    --trainer.callbacks+=tokenizer.training.callbacks.DistributedAudit
    --trainer.callbacks.init_args.out_dir RUN_DIR/audit

Files, one set per rank and per ``fit`` call (a resumed run adds a new set, tagged by its first step):
``rank{R}-from{S}-keys.json`` and ``rank{R}-from{S}-state.pt`` ({name: tensor} of ``named_parameters`` +
``named_buffers`` on CPU, plus ``"__global_step__"``). The JSON record::

    {"rank", "world_size", "num_nodes", "start_step", "end_step", "state_sha256",
     "batches": [[epoch, global_step, [keys...]], ...],           # one per batch, in order
     "ddp": null                                                   # the model was not wrapped in DDP, or
     "ddp": {"managed_elements": int,          # gradient elements of the parameters DDP manages
             "tokenizer_elements": int,        # gradient elements of the tokenizer's trainable parameters
             "reduced_per_batch": [int, ...],  # elements DDP's hook all-reduced, one entry per batch
             "tokenizer_grad_outside_ddp_per_batch": [int, ...],  # tokenizer gradient elements all-reduced
                                                                   # outside DDP, per batch (must be 0)
             "other_outside_ddp_per_batch": [int, ...],           # other elements all-reduced outside DDP
             "tokenizer_grad_outside_ddp_between_batches": int,   # the same, outside any batch (must be 0)
             "other_outside_ddp_between_batches": int}}
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading

import lightning.pytorch as pl
import torch
import torch.distributed as dist

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


def tokenizer_grad_elements(tensor: torch.Tensor, grads: list[torch.Tensor]) -> int:
    """How many elements of `tensor` (about to be all-reduced) are the gradients `grads`: all of them if it shares
    storage with one of them (the gradient itself, or a view of it), else those of the gradients it holds as
    bit-identical copies, in order, from its first element on (a flat buffer of `torch.cat`ed gradients). An
    all-zero gradient is never counted by the copy test (zeros are no evidence)."""
    storage = tensor.untyped_storage().data_ptr()
    if any(g.untyped_storage().data_ptr() == storage for g in grads):
        return tensor.numel()
    flat, pos, found = tensor.detach().reshape(-1), 0, 0
    for g in grads:
        n = g.numel()
        if g.dtype != flat.dtype or pos + n > flat.numel():
            continue
        if torch.equal(flat[pos : pos + n], g.detach().reshape(-1)):
            pos += n
            found += n if bool(g.any()) else 0
    return found


class DistributedAudit(pl.Callback):
    """Per-rank record of consumed sample keys, of what was all-reduced, and of the final weights (see the module
    docstring)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self._batches: list = []
        self._start_step: int | None = None
        self._ddp: dict | None = None
        self._in_batch = False
        self._in_ddp_hook = None
        self._original_all_reduce = None
        self._wrapper = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batches = []
        self._start_step = int(trainer.global_step)
        self._ddp = None
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
            managed = [p for n, p in pl_module.named_parameters() if p.requires_grad and n not in ignored]
            tokenizer = getattr(pl_module, "tokenizer", pl_module)
            self._tokenizer_params = [p for p in tokenizer.parameters() if p.requires_grad]
            self._ddp = {"managed_elements": sum(p.numel() for p in managed),
                         "tokenizer_elements": sum(p.numel() for p in self._tokenizer_params),
                         "reduced_per_batch": [],
                         "tokenizer_grad_outside_ddp_per_batch": [], "other_outside_ddp_per_batch": [],
                         "tokenizer_grad_outside_ddp_between_batches": 0, "other_outside_ddp_between_batches": 0}
            self._reduced = 0
            self._outside = [0, 0]  # this batch: tokenizer gradient elements, other elements
            # made here, not in __init__ (a spawn launcher pickles callbacks): DDP's hook may run on an autograd
            # thread, while another thread's all-reduce would still be outside DDP
            self._in_ddp_hook = threading.local()
            model.register_comm_hook(None, self._counting_allreduce)
            self._wrap_all_reduce()

    def _counting_allreduce(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._reduced += bucket.buffer().numel()  # host-side count of elements this bucket all-reduces
        self._in_ddp_hook.active = True  # the default hook calls dist.all_reduce: not an outside-DDP reduce
        try:
            return allreduce_hook(state, bucket)
        finally:
            self._in_ddp_hook.active = False

    # ---- all-reduces outside DDP ---------------------------------------------------------------------------
    def _wrap_all_reduce(self) -> None:
        if self._wrapper is not None:
            return
        original = dist.all_reduce

        @functools.wraps(original)
        def all_reduce(tensor, *args, **kwargs):
            # counted before the call: the copy test compares the values that are about to be reduced
            if self._wrapper is not None and not getattr(self._in_ddp_hook, "active", False):
                self._count_outside_ddp(tensor)
            return original(tensor, *args, **kwargs)

        self._original_all_reduce, self._wrapper = original, all_reduce
        dist.all_reduce = all_reduce

    def _restore_all_reduce(self) -> None:
        """Put torch.distributed.all_reduce back (idempotent). If something wrapped it again on top of ours, that
        wrapper stays, and ours, still in its chain, no longer counts."""
        if self._wrapper is None:
            return
        if dist.all_reduce is self._wrapper:
            dist.all_reduce = self._original_all_reduce
        self._wrapper = self._original_all_reduce = None

    def _count_outside_ddp(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        grads = [p.grad for p in self._tokenizer_params if p.grad is not None]
        tokenizer = tokenizer_grad_elements(tensor, grads)
        if self._in_batch:
            self._outside[0] += tokenizer
            self._outside[1] += tensor.numel() - tokenizer
        else:
            self._ddp["tokenizer_grad_outside_ddp_between_batches"] += tokenizer
            self._ddp["other_outside_ddp_between_batches"] += tensor.numel() - tokenizer

    # ---- per batch ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        keys = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
        if keys is None:
            raise RuntimeError(
                "DistributedAudit needs batches (images, labels, keys): set data return_keys=True"
            )
        self._batches.append([int(trainer.current_epoch), int(trainer.global_step), [str(k) for k in keys]])
        self._reduced = 0
        self._outside = [0, 0]
        self._in_batch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._in_batch = False
        if self._ddp is not None:
            self._ddp["reduced_per_batch"].append(self._reduced)
            self._ddp["tokenizer_grad_outside_ddp_per_batch"].append(self._outside[0])
            self._ddp["other_outside_ddp_per_batch"].append(self._outside[1])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_all_reduce()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_all_reduce()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_all_reduce()
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


__all__ = ["DistributedAudit", "state_tensors", "state_hash", "tokenizer_grad_elements"]
