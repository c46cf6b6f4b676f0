#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200, that proves the GPU path and prints its numbers.
#
#   scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#
# 1. bench_train.py, onedpiece-B-256 (bf16-mixed, compile on), tokenizer only, every timed step under
#    torch.cuda.set_sync_debug_mode("error") (--check-syncs: any host sync fails the run);
# 2. the same with the full objective (LPIPS + GAN + LeCam + EMA, GAN on from the first step);
# 3. the generator's B config (configs/generator/B.yaml: K 256, 4096 codes, bf16-mixed, fused AdamW, compile on):
#    the training step, img/s and MFU, every timed step under the sync check (bench_train.py);
# 4. the B generator's sampling throughput at k = 32 and 256 with CFG 2.0, bf16, KV cache (and without it at
#    k = 32), eager and with the compiled one-token step (CUDA graphs) (bench_sampling.py);
# 5. reconstruction-evaluation throughput of the B tokenizer (bench_eval.py).
# LPIPS uses a random backbone (same FLOPs): the weight files do not travel to the GPU machine.
#
# Dependencies: the GPU machine is offline. Wheels made here by `scripts/gpu_wheels.sh` (into .whl/) are installed
# first when the packages are missing. Each JSON line is printed again at the end; exit status non-zero on any
# failure. Knobs: PYTHON (python3), BATCH (32, per GPU), STEPS (10 timed batches), TIMEOUT (180 s per bench).
# From a session with the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-32}
STEPS=${STEPS:-10}
TIMEOUT=${TIMEOUT:-180}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
t0=$SECONDS
say() { echo "[gpu_check +$((SECONDS - t0))s] $*"; }

if ! "$PYTHON" -c "import vector_quantize_pytorch, webdataset, lpips, torch_fidelity, jsonargparse" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing the carried wheels (.whl/)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl || { say "FAILED: wheel install"; exit 1; }
    else
        say "FAILED: missing packages and no .whl/ (run scripts/gpu_wheels.sh on a machine with PyPI)"; exit 1
    fi
fi
"$PYTHON" - <<'PY' || exit 1
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "NO CUDA DEVICE")
assert torch.cuda.is_available(), "gpu_check needs a CUDA device"
PY

failed=()
results=()
run() {  # run NAME CMD...: the last stdout line must be a JSON object
    local name=$1 out
    shift
    say "$name: $*"
    out=$(timeout "$TIMEOUT" "$@" 2> >(tail -n 25 >&2)) || { say "FAILED: $name (status $?)"; failed+=("$name"); return; }
    local last=${out##*$'\n'}
    if [[ "$last" != \{* ]]; then say "FAILED: $name printed no JSON line"; failed+=("$name"); return; fi
    echo "$last"
    results+=("$name $last")
}

CFG=configs/tokenizer/onedpiece-B-256.yaml
run tokenizer_only "$PYTHON" scripts/bench_train.py --config "$CFG" --device cuda --batch-size "$BATCH" \
    --steps "$STEPS" --compile --tokenizer-only --check-syncs
run full_objective "$PYTHON" scripts/bench_train.py --config "$CFG" --device cuda --batch-size "$BATCH" \
    --steps "$STEPS" --compile --random-lpips --check-syncs
run generator_train "$PYTHON" scripts/bench_train.py --config configs/generator/B.yaml --device cuda \
    --batch-size "$BATCH" --steps "$STEPS" --compile --check-syncs
run generator_sampling "$PYTHON" scripts/bench_sampling.py --preset B --device cuda --batch-sizes 64 \
    --num-tokens 32 256 --cfg-scale 2.0 --dtype bfloat16 --no-cache-max-tokens 32
run generator_sampling_compiled "$PYTHON" scripts/bench_sampling.py --preset B --device cuda --batch-sizes 64 \
    --num-tokens 32 256 --cfg-scale 2.0 --dtype bfloat16 --compile --no-cache-max-tokens 0
run reconstruction_eval "$PYTHON" scripts/bench_eval.py --preset B --device cuda --precision bf16 \
    --batch-size 64 --num-tokens 32 256

say "---- results ----"
for r in "${results[@]}"; do echo "$r"; done
if ((${#failed[@]})); then
    say "GPU CHECK FAILED: ${failed[*]}"
    exit 1
fi
say "GPU CHECK PASSED"
