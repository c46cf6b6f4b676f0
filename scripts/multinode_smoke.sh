#!/usr/bin/env bash
# Multi-node training, proved on one machine: two "nodes" (two torchrun agents, one process each) train the
# tiny tokenizer with Lightning DDP over gloo on CPU from webdataset shards, then resume from `last`.
#
#   scripts/multinode_smoke.sh                 # must print "MULTINODE SMOKE PASSED" and exit 0
#   BREAK_SYNC=1 scripts/multinode_smoke.sh    # codebook sync off: must FAIL check (b) and exit 1
#
# Steps:
#   1. writes JPEG crops of the embedded scikit-image photos to an ImageFolder tree and converts it to
#      webdataset shards with data.convert_shards (8 shards: 2 ranks x 2 workers each, split mode);
#   2. fit #1: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1} --master_addr 127.0.0.1` to STEPS1,
#   3. fit #2: the same with `--ckpt_path last` to STEPS2 (resume);
#   4. scripts/multinode_check.py checks (a) disjoint samples per rank, (b) bit-identical parameters and
#      buffers (VQ codebook included) on both ranks after each fit, (c) the resumed global step and the
#      final checkpoint, (d) DDP all-reduced each tokenizer gradient once per batch and nothing else, and no
#      tokenizer gradient was all-reduced outside DDP. The callback tokenizer.training.callbacks.DistributedAudit
#      records what it checks.
#
# Environment: PYTHON (default .venv/bin/python), TORCHRUN (default: next to PYTHON), STEPS1 (6), STEPS2 (12),
# NUM_WORKERS (2, DataLoader workers per rank), PER_PHOTO (12 crops per photo, 14 photos), BREAK_SYNC (0),
# STRATEGY (ddp, the value of --trainer.strategy),
# RUN_DIR (kept; default: a new temp dir, deleted on success unless KEEP=1), RANK_TIMEOUT (300 s per fit).
set -euo pipefail

# Paths given by the caller are relative to the caller's directory; everything else to the repo root.
abspath() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }  # no symlink resolution (venvs)
if [[ "${PYTHON:-}" == */* ]]; then PYTHON=$(abspath "$PYTHON"); fi
if [[ "${TORCHRUN:-}" == */* ]]; then TORCHRUN=$(abspath "$TORCHRUN"); fi
if [[ -n "${RUN_DIR:-}" ]]; then mkdir -p "$RUN_DIR" && RUN_DIR=$(abspath "$RUN_DIR"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PYTHON")/torchrun}
STEPS1=${STEPS1:-6}
STEPS2=${STEPS2:-12}
NUM_WORKERS=${NUM_WORKERS:-2}
PER_PHOTO=${PER_PHOTO:-12}
BREAK_SYNC=${BREAK_SYNC:-0}
RANK_TIMEOUT=${RANK_TIMEOUT:-300}
# the strategy flag of scripts/slurm_train.sbatch and docs/multinode.md (on CPU Lightning's DDP runs over gloo)
STRATEGY=${STRATEGY:-ddp}
KEEP=${KEEP:-0}
if [[ -n "${RUN_DIR:-}" ]]; then
    # reuse only an empty directory or one of an earlier smoke run (never wipe anything else)
    if [[ -n "$(ls -A "$RUN_DIR")" && ! -e "$RUN_DIR/shards/train-meta.json" ]]; then
        echo "RUN_DIR=$RUN_DIR is not empty and not a multinode_smoke run dir; refusing to clear it" >&2
        exit 2
    fi
    rm -rf "${RUN_DIR:?}"/* && mkdir -p "$RUN_DIR"
else
    RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/multinode_smoke.XXXXXX")
    TEMP_RUN_DIR=1
fi
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# Two CPU processes on a shared machine: one thread each, gloo over loopback.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
export PYTHONUNBUFFERED=1

t0=$SECONDS
say() { echo "[multinode_smoke +$((SECONDS - t0))s] $*"; }

# ---- 1. shards ----------------------------------------------------------------------------------------------
say "run dir $RUN_DIR"
# One interpreter for both steps (imports are slow on busy cores): JPEG crops -> ImageFolder, then
# `python -m data.convert_shards --src images --out shards --split train --shard-size ceil(N/8)` (its main()).
"$PYTHON" scripts/multinode_check.py shards "$RUN_DIR" --per-photo "$PER_PHOTO" --size 48 --num-shards 8
SHARDS="$RUN_DIR/shards/train-{000000..000007}.tar"
say "shards written: $(ls "$RUN_DIR/shards"/train-*.tar | wc -l) tar files"

# ---- 2./3. two fits, each as two single-process "nodes" -----------------------------------------------------
free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

TRAIN_ARGS=(
    --config configs/tokenizer/tiny.yaml
    --config scripts/multinode_smoke.yaml
    --trainer.accelerator cpu
    --trainer.devices 1
    --trainer.num_nodes 2
    --trainer.strategy "$STRATEGY"
    --trainer.default_root_dir "$RUN_DIR"
    --trainer.logger.init_args.save_dir "$RUN_DIR"
    "--trainer.callbacks+=tokenizer.training.callbacks.DistributedAudit"
    --trainer.callbacks.init_args.out_dir "$RUN_DIR/audit"
    --data.init_args.train_shards "$SHARDS"
    --data.init_args.num_workers "$NUM_WORKERS"
)
if [[ "$BREAK_SYNC" == 1 ]]; then
    say "BREAK_SYNC=1: VQ codebook sync across ranks turned OFF (the check must fail)"
    TRAIN_ARGS+=(--model.init_args.overrides "$("$PYTHON" - <<'PY'
import yaml
cfg = yaml.safe_load(open("scripts/multinode_smoke.yaml"))["model"]["init_args"]["overrides"]
cfg["vq_sync_codebook"] = False
print(yaml.safe_dump(cfg, default_flow_style=True).strip())
PY
)")
fi

# EXTRA_ARGS: more train.py arguments, e.g. the full objective under DDP:
#   EXTRA_ARGS="--model.init_args.gan_weight 0.1 --model.init_args.gan_start 1 --model.init_args.ema_decay 0.9"
#       scripts/multinode_smoke.sh
if [[ -n "${EXTRA_ARGS:-}" ]]; then
    read -ra extra_args <<<"$EXTRA_ARGS"
    TRAIN_ARGS+=("${extra_args[@]}")
fi

fit() {  # fit NAME MAX_STEPS [extra args...]
    local name=$1 steps=$2
    shift 2
    local port pids=() rc=0
    port=$(free_port)
    say "fit '$name' to step $steps: 2 nodes x 1 process, master 127.0.0.1:$port"
    for node in 0 1; do
        timeout "$RANK_TIMEOUT" "$TORCHRUN" --nnodes 2 --nproc_per_node 1 --node_rank "$node" \
            --master_addr 127.0.0.1 --master_port "$port" --max_restarts 0 \
            train.py fit "${TRAIN_ARGS[@]}" --trainer.max_steps "$steps" "$@" \
            >"$RUN_DIR/$name-node$node.log" 2>&1 &
        pids+=($!)
    done
    # When one node fails the other would wait in a collective until the timeout: stop it at once.
    local running=("${pids[@]}")
    while ((${#running[@]})); do
        local still=()
        for p in "${running[@]}"; do
            if kill -0 "$p" 2>/dev/null; then
                still+=("$p")
                continue
            fi
            local st=0
            wait "$p" || st=$?
            if ((st != 0 && rc == 0)); then
                rc=$st
                for q in "${pids[@]}"; do kill "$q" 2>/dev/null || true; done
            fi
        done
        running=("${still[@]+"${still[@]}"}")
        ((${#running[@]} == 0)) || sleep 1
    done
    if ((rc != 0)); then
        for node in 0 1; do
            echo "----- $name node $node (last 30 lines of $RUN_DIR/$name-node$node.log) -----"
            tail -n 30 "$RUN_DIR/$name-node$node.log"
        done
        say "FAILED: fit '$name' exited with status $rc"
        return 1
    fi
    say "fit '$name' done"
}

fit fit1 "$STEPS1"
fit fit2 "$STEPS2" --ckpt_path last

# ---- 4. checks ----------------------------------------------------------------------------------------------
rc=0
"$PYTHON" scripts/multinode_check.py check "$RUN_DIR" --world-size 2 --steps "$STEPS1" "$STEPS2" || rc=$?
say "total $((SECONDS - t0))s"
if ((rc == 0)) && [[ "$KEEP" != 1 && "${TEMP_RUN_DIR:-0}" == 1 ]]; then
    rm -rf "$RUN_DIR"
else
    say "outputs kept in $RUN_DIR"
fi
exit "$rc"
