"""A bounded wait for a rank that stops answering, and an error that says where the others waited.

A frozen rank (stopped, deadlocked, blocked on a filesystem or a GPU) does not close its connections: the other
ranks wait in their next collective until the process group's timeout, silent and writing nothing. Lightning's
default is PyTorch's 30 minutes. train.py's `--collective_timeout` (seconds, `DEFAULT_COLLECTIVE_TIMEOUT_S`) is
given to the strategy that `--trainer.strategy` names (`ddp`, the documented launches), which passes it to
`init_process_group`. Long enough for the longest one-sided wait of a healthy run: rank 0 writing a checkpoint while
the others wait in the barrier after it (9.8 GB for an L tokenizer with its optimizer state: ~100 s at 100 MB/s).
A strategy given as `class_path` keeps its own `init_args.timeout`; with `auto`, Lightning's default stays.

On timeout gloo raises, in each waiting rank, `RuntimeError: [.../unbound_buffer.cc:78] Timed out waiting 600000ms
for recv operation to complete` or `Application timeout caused pair closure`, and `Connection closed by peer
[addr]:port` when a peer died: none names the collective or the rank. `collective_failure_message` turns each into
one line with this rank, the collective (the torch.distributed function in the traceback; DDP's gradient all-reduce
when it came from backward), the code of this repository that issued it, and what to do. The rank that hangs
prints nothing, which is how to find it among the logs.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.strategies import Strategy, StrategyRegistry

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0

_REPO = Path(__file__).resolve().parents[2]
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe", re.IGNORECASE)


def strategy_with_timeout(strategy, seconds: float) -> Strategy | None:
    """The strategy that the registry name `strategy` (e.g. "ddp") stands for, built with a collective timeout of
    `seconds`; None when `strategy` is no such name or its class takes no timeout (then nothing changes)."""
    if seconds <= 0:
        raise ValueError(f"--collective_timeout must be > 0 seconds, got {seconds}")
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return None
    entry = StrategyRegistry[strategy]
    if "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return None
    return entry["strategy"](**{**entry["init_params"], "timeout": timedelta(seconds=seconds)})


def collective_failure_message(error: BaseException) -> str | None:
    """One readable line for a collective that timed out or lost its peer, or None for any other error."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not (_TIMED_OUT.search(text) or _PEER_LOST.search(text)):
        return None
    frames = traceback.extract_tb(error.__traceback__)
    collective, caller = _collective_and_caller(frames)
    if collective is None:
        return None  # a timeout of something else (a store, a file lock): not ours to explain
    rank, world = _rank_and_world()
    waited = re.search(r"waiting (\d+)\s*ms", text)
    where = f"rank {rank} of {world}: {collective}" + (f" (issued by {caller})" if caller else "")
    detail = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if _PEER_LOST.search(text):
        what = (f"{where} lost a peer rank: it exited or was killed (look at its log for why). This rank stops "
                "here.")
    else:
        after = f" after {int(waited.group(1)) / 1000:g} s" if waited else ""
        what = (f"{where} timed out{after}: another rank never joined it. A frozen rank (stopped, deadlocked, "
                "blocked on a filesystem or a GPU) prints no such message: it is the rank whose log does not end "
                "with one. The wait is --collective_timeout (seconds).")
    return (f"{what} Resume with --ckpt_path last: it takes the newest checkpoint that loads. "
            f"[{type(error).__name__}: {detail}]")


def _collective_and_caller(frames: list[traceback.FrameSummary]) -> tuple[str | None, str | None]:
    """The innermost torch.distributed collective in `frames` (or DDP's, when the error came out of backward) and
    the code that issued it: the innermost frame of this repository before it, else the innermost outside torch."""
    paths = [f.filename.replace(os.sep, "/") for f in frames]
    markers = [("/torch/distributed/distributed_c10d.py", None)]
    if dist.is_available() and dist.is_initialized():  # a backward of one process waits for nobody
        markers.append(("/torch/autograd/", "DDP's gradient all-reduce (in backward)"))
    for marker, name in markers:
        inner = [i for i, p in enumerate(paths) if marker in p]
        if inner:
            i = inner[-1]
            outside = [f for f, p in zip(frames[:i], paths[:i]) if "/torch/" not in p]
            ours = [f for f in outside if _in_repo(f)]
            caller = (ours or outside or [None])[-1]
            return name or frames[i].name, None if caller is None else _where(caller)
    return None, None


def _in_repo(frame: traceback.FrameSummary) -> bool:
    path = Path(frame.filename).resolve()
    return path.is_relative_to(_REPO) and "site-packages" not in path.parts


def _where(frame: traceback.FrameSummary) -> str:
    """`file:line in function`, the file relative to this repository or to site-packages."""
    path = Path(frame.filename).resolve()
    if "site-packages" in path.parts:
        shown = "/".join(path.parts[path.parts.index("site-packages") + 1:])
    else:
        shown = str(path.relative_to(_REPO)) if path.is_relative_to(_REPO) else str(path)
    return f"{shown}:{frame.lineno} in {frame.name}"


def _rank_and_world() -> tuple[str, str]:
    if dist.is_available() and dist.is_initialized():
        return str(dist.get_rank()), str(dist.get_world_size())
    return os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")


__all__ = ["DEFAULT_COLLECTIVE_TIMEOUT_S", "strategy_with_timeout", "collective_failure_message"]
