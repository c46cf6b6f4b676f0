"""Stopping a training on a signal, and a rank that stops answering: real signals sent to real training processes
(tokenizer/training/preemption.py, tokenizer/training/collective_timeout.py, data/worker_signals.py).

The two-rank tests launch two single-process torchrun "nodes" over gloo on CPU, as scripts/multinode_smoke.sh does,
with its shrunken tiny tokenizer and webdataset shards (2 DataLoader workers per rank).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from _eval_helpers import free_port, torchrun_two_ranks
from _scripts import load_script
from _small_training import tiny_fit_args

from tokenizer.checkpoints import checkpoint_files, read_checkpoint
from tokenizer.training.preemption import STOP_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over 'lo', /proc (Linux)")


# ---- DataLoader workers ---------------------------------------------------------------------------------------
# A training process of its own (a fresh interpreter: its forkserver and resource tracker are its own, whatever
# earlier tests started): it makes the loader, takes one batch from each worker (both have run their
# worker_init_fn), prints the pids of its workers and helpers, waits for "go", then reads 20 more batches.
WORKERS_UNDER_SIGNALS = """
import json, os, sys
import numpy as np
import psutil

def photos(tmp):
    from data.photos import PhotosDataModule
    dm = PhotosDataModule(image_size=32, batch_size=4, num_workers=2, train_crops_per_epoch=400)
    dm.setup("fit")
    return dm.train_dataloader()

def tokens(tmp):
    from data.tokens import TokenDataModule, TokenShardWriter
    root = os.path.join(tmp, "tokens")
    with TokenShardWriter(root, num_tokens=8, codebook_size=16, shard_size=100) as w:
        w.write(np.zeros((400, 8), np.int64), np.zeros(400, np.int64), [f"k{i}" for i in range(400)])
    dm = TokenDataModule(root, batch_size=4, num_workers=2)
    dm.setup("fit")
    return dm.train_dataloader()

me = psutil.Process()
batches = iter({"images": photos, "tokens": tokens}[sys.argv[1]](sys.argv[2]))
next(batches), next(batches)
# the forkserver and the resource tracker: their command line is python -c "from multiprocessing.... import main..."
helpers = [p for p in me.children() if any(arg.startswith("from multiprocessing.") for arg in p.cmdline())]
workers = [p for p in me.children(recursive=True) if p not in helpers]
print(json.dumps({"workers": [p.pid for p in workers], "parents": sorted({p.ppid() for p in workers}),
                  "helpers": [p.pid for p in helpers]}), flush=True)
sys.stdin.readline()
for _ in range(20):  # both workers' batches, past those already queued
    next(batches)
print("read", flush=True)
"""


@linux_only
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("loader", ["images", "tokens"])
def test_dataloader_workers_ignore_the_stop_signals(tmp_path, loader, start_method):
    """SLURM signals every process of a job step: a worker that died of SIGUSR1 or SIGTERM would end the batch
    stream before the training process has saved its checkpoint; so would the forkserver the workers came from
    (their watchdog stops them when their parent goes) and the resource tracker. Both ways workers start
    (data/worker_context.py: fork where the interpreter forks safely, a forkserver where it does not) are forced
    with ONEDTOK_WORKER_START, so that one interpreter tests both."""
    from data.worker_context import START_METHOD_ENV

    env = {**ENV, START_METHOD_ENV: start_method, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_UNDER_SIGNALS, loader, str(tmp_path)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline() or "{}")
        assert len(pids.get("workers", [])) == 2, json.dumps(pids)
        expected_parents = [proc.pid] if start_method == "fork" else pids["helpers"]
        assert set(pids["parents"]) <= set(expected_parents) and len(pids["parents"]) == 1, pids
        everyone = [psutil.Process(pid) for pid in pids["workers"] + pids["helpers"]]
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            send_from_elsewhere(signum, [p.pid for p in everyone])
        time.sleep(1.0)
        dead = [p for p in everyone if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
        assert not dead, f"died of a stop signal: {dead} of {pids}"
        out, err = proc.communicate("go\n", timeout=120)
        assert proc.returncode == 0 and "read" in out, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def send_from_elsewhere(signum: signal.Signals, pids: list[int]) -> None:
    """`kill` run as its own process: the sender is not the workers' parent (as with SLURM's step daemon)."""
    subprocess.run(["kill", "-s", signum.name[3:], *map(str, pids)], check=True)


# A process that exits while its DataLoader still has workers: multiprocessing terminates them (SIGTERM from their
# parent) and waits for them. A worker that ignored that SIGTERM too kept the process from ever exiting.
EXIT_WITH_LIVE_WORKERS = """
import torch
from data.loading import loader_kwargs
batches = iter(torch.utils.data.DataLoader(range(10**6), batch_size=4, **loader_kwargs(2, pin_memory=False)))
next(batches)
print("exiting", flush=True)
"""


@linux_only
def test_workers_still_stop_when_their_training_process_exits():
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-3000:]


# ---- one process: SIGTERM ------------------------------------------------------------------------------------
def one_process_args(run: Path, steps: int) -> list[str]:
    return tiny_fit_args(run, steps)


def wait_until(ready, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process exited (status {[p.poll() for p in procs]}) before {what}")
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def checkpoint_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"]) if path.is_file() else -1


FAKE_SCONTROL = """#!/bin/sh
# what `scontrol` was asked, and whether the stop checkpoint was complete by then
echo "$@ $( [ -s "$STOP_CKPT" ] && echo after-save || echo before-save )" >> "$SCONTROL_LOG"
"""


def fake_slurm(tmp_path: Path, stop_checkpoint: Path) -> dict[str, str]:
    """The environment of a SLURM job 4242 whose `scontrol` (first on PATH) appends its arguments to
    tmp_path/scontrol.log, with "after-save" when `stop_checkpoint` was complete by then."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(FAKE_SCONTROL)
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    return {**ENV, "SLURM_JOB_ID": "4242", "PATH": f"{tmp_path / 'bin'}{os.pathsep}{ENV['PATH']}",
            "STOP_CKPT": str(stop_checkpoint), "SCONTROL_LOG": str(tmp_path / "scontrol.log")}


def scontrol_calls(tmp_path: Path) -> str:
    return (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_the_step_it_stops_at_exits_nonzero_and_resumes(tmp_path, capfd, one_thread, signum, status):
    """Under SLURM (a job id, and an `scontrol` on PATH that records its calls), SIGUSR1 also requeues the job once
    the checkpoint is written; SIGTERM (preemption, scancel) does not."""
    import train

    run = tmp_path / "run"
    env = fake_slurm(tmp_path, run / "ckpt" / STOP_CHECKPOINT)
    proc = subprocess.Popen([sys.executable, "train.py", *one_process_args(run, 100000)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: checkpoint_step(run / "ckpt" / "last.ckpt") >= 4, [proc], 300, "a checkpoint at step 4")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-3000:]  # 128 + the signal: a failure for &&, make and SLURM
    stopped = re.search(rf"stop: rank 0: stopped after optimizer step (\d+) \({signum.name} on 1 of 1 rank\(s\)\)",
                        err)
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert checkpoint_step(run / "ckpt" / STOP_CHECKPOINT) == step >= checkpoint_step(run / "ckpt" / "last.ckpt")
    requeued = scontrol_calls(tmp_path)
    assert requeued == ("requeue 4242 after-save\n" if signum == signal.SIGUSR1 else ""), requeued

    cli = train.main(one_process_args(run, step + 2) + ["--ckpt_path", "last"])
    assert f"resume: from {run / 'ckpt' / STOP_CHECKPOINT}" in capfd.readouterr().err
    assert cli.trainer.global_step == step + 2


# ---- two ranks ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Webdataset shards of crops of the embedded photographs (8 shards: 2 ranks x 2 workers, split mode)."""
    out = tmp_path_factory.mktemp("shards")
    assert load_script("multinode_check").main(["shards", str(out), "--per-photo", "4", "--size", "48"]) == 0
    return str(out / "shards" / "train-{000000..000007}.tar")


def rank_args(run: Path, shards: str, *extra: str) -> list[str]:
    """train.py arguments of one rank of the two (scripts/multinode_smoke.sh's run, one checkpoint every 2 steps)."""
    return [
        "fit", "--config", str(REPO / "configs/tokenizer/tiny.yaml"),
        "--config", str(REPO / "scripts/multinode_smoke.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.default_root_dir", str(run),
        "--trainer.logger.init_args.save_dir", str(run), "--trainer.callbacks.init_args.every_n_train_steps", "2",
        "--data.init_args.train_shards", shards, "--data.init_args.num_workers", "2", *extra,
    ]  # fmt: skip


def launch_two_ranks(run: Path, shards: str, *extra: str, env: dict[str, str] = ENV) -> list[subprocess.Popen]:
    """Two torchrun agents ("nodes" 0 and 1, one process each); their output goes to run/node{0,1}.log."""
    run.mkdir(parents=True, exist_ok=True)
    port, agents = free_port(), []
    for node in (0, 1):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "--max_restarts", "0", "train.py",
               *rank_args(run, shards, "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", *extra)]
        with open(run / f"node{node}.log", "w") as log:
            agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return agents


def rank_process(agent: subprocess.Popen) -> psutil.Process:
    """The training process that torchrun `agent` started."""
    children = psutil.Process(agent.pid).children()
    assert len(children) == 1, children
    return children[0]


def wait_all(agents: list[subprocess.Popen], timeout: float, since: str) -> list[int]:
    """The agents' exit statuses; kills every process of the launch and fails if one is still running after
    `timeout` seconds (a hang)."""
    deadline = time.monotonic() + timeout
    try:
        return [a.wait(timeout=max(0.0, deadline - time.monotonic())) for a in agents]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout:.0f} s {since}: a hang") from None
    finally:
        kill_all(agents)


def kill_all(agents: list[subprocess.Popen]) -> None:
    for agent in agents:
        try:
            tree = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        agent.wait()


def logs(run: Path) -> list[str]:
    return [(run / f"node{node}.log").read_text() for node in (0, 1)]


@pytest.mark.slow
@linux_only
def test_sigusr1_to_one_rank_mid_step_stops_both_at_the_same_step_and_they_resume_identical(tmp_path, shards):
    """The signal reaches rank 1 and its DataLoader workers only (SLURM signals every process of a task), at a
    random point of a step, in a (fake) SLURM job. Both ranks must save the same step, rank 0 requeue the job once
    the checkpoint is complete, both exit with 138 (128 + SIGUSR1), and resume from it to bit-identical weights;
    no rank may hang (each wait is bounded)."""
    run = tmp_path / "run"
    ckpt_dir = run / "run" / "checkpoints"  # the smoke config's ModelCheckpoint: <save_dir>/<name>/checkpoints
    agents = launch_two_ranks(run, shards, "--trainer.max_steps", "100000",
                              env=fake_slurm(tmp_path, ckpt_dir / STOP_CHECKPOINT))
    try:
        wait_until(lambda: checkpoint_step(ckpt_dir / "last.ckpt") >= 2, agents, 300, "a checkpoint at step 2")
        time.sleep(random.uniform(0.0, 1.0))  # somewhere in a step: data, forward, backward, all-reduces
        target = rank_process(agents[1])
        for p in [target, *target.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
    except BaseException:
        kill_all(agents)
        raise
    statuses = wait_all(agents, timeout=120, since="after the signal")
    out = logs(run)
    assert statuses == [1, 1], out  # torchrun reports a failed worker; the worker's own status is below
    steps = []
    for rank, text in enumerate(out):
        stopped = re.search(rf"stop: rank {rank}: stopped after optimizer step (\d+) \(SIGUSR1 on 1 of 2 rank\(s\)\)",
                            text)
        assert stopped, text[-3000:]
        assert re.search(r"exitcode\s*: 138 ", text), text[-3000:]
        steps.append(int(stopped.group(1)))
    assert steps[0] == steps[1] == checkpoint_step(ckpt_dir / STOP_CHECKPOINT), steps
    assert scontrol_calls(tmp_path) == "requeue 4242 after-save\n"  # rank 0 only, after the save
    step = steps[0]

    audit = run / "audit"
    # the resume with DataLoader workers, as the first launch: they start from a forkserver (data/loading.py), not
    # by forking the multi-threaded training process, which could deadlock in CPython itself (gh-112275)
    agents = launch_two_ranks(run, shards, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last",
                              "--trainer.callbacks+=tokenizer.training.callbacks.DistributedAudit",
                              "--trainer.callbacks.init_args.out_dir", str(audit))
    assert wait_all(agents, timeout=300, since="after the resumed launch") == [0, 0], logs(run)
    assert f"Restored all states from the checkpoint at {ckpt_dir / STOP_CHECKPOINT}" in logs(run)[0]  # rank 0 says
    same, detail = load_script("multinode_check").compare_states(
        [str(audit / f"rank{r}-from{step}-state.pt") for r in (0, 1)])  # named by the step each rank resumed at
    assert same, detail


@pytest.mark.slow
@linux_only
def test_a_frozen_rank_fails_the_other_within_the_collective_timeout_and_the_run_resumes(tmp_path, shards,
                                                                                          one_thread):
    import train

    run = tmp_path / "run"
    ckpt_dir = run / "run" / "checkpoints"
    agents = launch_two_ranks(run, shards, "--trainer.max_steps", "100000", "--collective_timeout", "10")
    try:
        wait_until(lambda: checkpoint_step(ckpt_dir / "last.ckpt") >= 2, agents, 300, "a checkpoint at step 2")
        frozen = rank_process(agents[1])
        frozen.suspend()  # SIGSTOP: its sockets stay open, it answers nothing
        stopped_at = time.monotonic()
        status = agents[0].wait(timeout=10 + 60)
        waited = time.monotonic() - stopped_at
    except subprocess.TimeoutExpired:
        raise AssertionError("rank 0 still waits 70 s after its peer froze (collective timeout 10 s)") from None
    finally:
        kill_all(agents)
    text = logs(run)[0]
    assert status == 1 and waited < 10 + 45, (status, waited, text[-3000:])
    # gloo says "Timed out waiting 10000ms for recv" or "Application timeout caused pair closure"
    failed = re.search(r"error: rank 0 of 2: (.+?) (?:\(issued by (.+?)\) )?timed out(?: after 10 s)?: another "
                       r"rank never joined it", text)
    assert failed, text[-3000:]
    assert "Traceback" not in text.split("error: rank 0 of 2")[0][-2000:], "one message, not a traceback"

    # the run directory holds checkpoints that load, and `--ckpt_path last` continues from the newest
    found = checkpoint_files([ckpt_dir])
    assert found and all(checkpoint_step(p) >= 2 for p in found)
    newest = checkpoint_step(found[0])
    cli = train.main(rank_args(run, shards, "--trainer.max_steps", str(newest + 1), "--ckpt_path", "last",
                               "--data.init_args.num_workers", "0"))
    assert cli.trainer.global_step == newest + 1  # one step after the newest checkpoint (>= 2), not from step 0


@pytest.mark.slow
@linux_only
def test_a_ddp_step_makes_no_host_sync_with_stop_on_signal_in_place(tmp_path):
    """Lightning broadcasts rank 0's SIGTERM flag and reads it with .item() before every DDP batch: one collective
    and one host sync per step (before: every audited step of both ranks synced at training_epoch_loop.py).
    StopOnSignal owns the signal and checks every N batches instead, so a step between checks reads nothing."""
    proc = torchrun_two_ranks("_ddp_step_syncs", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pt")
        assert record["audited"] >= 3, record
        quiet = record["quiet"]
        assert not quiet, f"rank {rank}: {[record['sites'][b] for b in quiet]}"
