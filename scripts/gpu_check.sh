#!/usr/bin/env bash
# The GPU check: one script that proves the GPU path on one H100/H200 and prints its numbers, in two parts that
# each fit one call of the device tool (under 6 minutes each), or both at once.
#
#   scripts/gpu_check.sh                        # on the GPU machine, from the repository root: every phase
#   scripts/gpu_check.sh --part tokenizer       # phases 1, 2, 5, 6   (--part generator: phases 3, 4)
#   scripts/gpu_check.sh --device cpu           # the CPU dry run: every phase at a tiny size, 1 warm-up + 2 steps,
#                                               # compile on (a few minutes on 2 cores; tests/test_gpu_check.py)
#
# 1. tokenizer_only: bench_train.py, onedpiece-B-256 (bf16-mixed, compile on), tokenizer only, every timed step
#    under torch.cuda.set_sync_debug_mode("error") (--check-syncs: any host sync fails the run);
# 2. full_objective: the same with the full objective (LPIPS + GAN + LeCam + EMA, GAN on from the first step);
# 3. generator_train: the generator's B config (configs/generator/B.yaml: K 256, 4096 codes, bf16-mixed, fused
#    AdamW, compile on): the training step, img/s and MFU, every timed step under the sync check (bench_train.py);
# 4. generator_sampling(_compiled): the B generator's sampling throughput at k = 32 and 256 with CFG 2.0, bf16,
#    KV cache (and without it at k = 32), eager and with the compiled one-token step (CUDA graphs)
#    (bench_sampling.py);
# 5. reconstruction_eval: reconstruction-evaluation throughput of the B tokenizer (bench_eval.py);
# 6. released_eval: the same for a converted One-D-Piece-B-256 (random weights, same speed: its ViT B plus the
#    MaskGIT-VQGAN pixel decoder, channels_last, bf16), k = 32 and 256 (docs/released_weights.md).
# LPIPS uses a random backbone (same FLOPs): the weight files do not travel to the GPU machine.
#
# What bounds the time (docs/multinode.md has the figures): the transformer blocks are compiled per block, one graph
# per stack (tokenizer/compiling.py), the decoder's length dynamic from the first call; FLOPs are counted on fake
# tensors on the host, not by an eager rerun (bench_train.py). Each phase prints `[gpu_check +Ns]` at its start and
# end, and the end a summary of every phase's seconds.
#
# Dependencies: the GPU machine is offline. Wheels made here by `scripts/gpu_wheels.sh` (into .whl/) are installed
# first when the packages are missing. Each JSON line is printed again at the end; exit status non-zero on any
# failure, or when --device cuda (the default) finds no CUDA device. Knobs: PYTHON (python3), BATCH (32, per GPU),
# STEPS (10 timed batches), TIMEOUT (180 s per bench; 600 on --device cpu).
# From a session with the device tool: run(command="bash scripts/gpu_check.sh --part tokenizer", carry=[".whl"],
# timeout_s=360), then the same with --part generator.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART=all
DEVICE=cuda
while (($#)); do
    case $1 in
        --part) PART=${2:-}; shift 2 ;;
        --device) DEVICE=${2:-}; shift 2 ;;
        -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (--part tokenizer|generator|all, --device cuda|cpu)" >&2; exit 2 ;;
    esac
done
case $PART in tokenizer | generator | all) ;; *) echo "gpu_check.sh: --part must be tokenizer, generator or all, not '$PART'" >&2; exit 2 ;; esac
case $DEVICE in cuda | cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-32}
STEPS=${STEPS:-10}
if [[ $DEVICE == cpu ]]; then TIMEOUT=${TIMEOUT:-600}; else TIMEOUT=${TIMEOUT:-180}; fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
t0=$SECONDS
say() { echo "[gpu_check +$((SECONDS - t0))s] $*"; }
say "part $PART, device $DEVICE"

if ! "$PYTHON" -c "import vector_quantize_pytorch, webdataset, lpips, torch_fidelity, jsonargparse" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing the carried wheels (.whl/)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl || { say "FAILED: wheel install"; exit 1; }
    else
        say "FAILED: missing packages and no .whl/ (run scripts/gpu_wheels.sh on a machine with PyPI)"; exit 1
    fi
fi
if [[ $DEVICE == cuda ]]; then
    "$PYTHON" - <<'PY' || { say "FAILED: no CUDA device (for the CPU dry run: --device cpu)"; exit 1; }
import sys
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0)
      if torch.cuda.is_available() else "NO CUDA DEVICE")
sys.exit(0 if torch.cuda.is_available() else 1)
PY
fi

failed=()
results=()
phases=()
run() {  # run NAME CMD...: the last stdout line must be a JSON object
    local name=$1 out start=$SECONDS
    shift
    say "START $name: $*"
    out=$(timeout "$TIMEOUT" "$@" 2> >(tail -n 25 >&2))
    local status=$?
    phases+=("$name $((SECONDS - start))s")
    if ((status)); then say "FAILED: $name (status $status) after $((SECONDS - start))s"; failed+=("$name"); return; fi
    local last=${out##*$'\n'}
    if [[ "$last" != \{* ]]; then say "FAILED: $name printed no JSON line"; failed+=("$name"); return; fi
    echo "$last"
    results+=("$name $last")
    say "END $name: $((SECONDS - start))s"
}

if [[ $DEVICE == cuda ]]; then
    TOK=(--config configs/tokenizer/onedpiece-B-256.yaml --device cuda --batch-size "$BATCH" --steps "$STEPS")
    GEN=(--config configs/generator/B.yaml --device cuda --batch-size "$BATCH" --steps "$STEPS")
    SAMPLE=(--preset B --device cuda --batch-sizes 64 --num-tokens 32 256 --cfg-scale 2.0 --dtype bfloat16)
    SAMPLE_NO_CACHE=32
    EVAL=(--preset B --device cuda --precision bf16 --batch-size 64 --num-tokens 32 256)
    RELEASED=(--released one-d-piece-B-256 --device cuda --precision bf16 --batch-size 64 --num-tokens 32 256)
else  # the dry run: the same configs and objectives at a tiny size, 1 warm-up + 2 timed steps, compile on
    TINY='{"image_size": 32, "patch_size": 8, "max_tokens": 16, "enc_width": 32, "enc_depth": 2, "enc_heads": 2,'
    TINY+=' "dec_width": 32, "dec_depth": 2, "dec_heads": 2}'
    TOK=(--config configs/tokenizer/onedpiece-B-256.yaml --device cpu --batch-size 2 --steps 2 --warmup 1
         --preset tiny --overrides "$TINY")
    GEN=(--config configs/generator/B.yaml --device cpu --batch-size 2 --steps 2 --warmup 1 --preset tiny
         --vocab-size 64 --max-tokens 16)
    SAMPLE=(--preset tiny --device cpu --batch-sizes 2 --num-tokens 4 8 --cfg-scale 2.0 --dtype float32
            --vocab-size 64 --num-classes 10 --repeats 1)
    SAMPLE_NO_CACHE=4
    EVAL=(--preset tiny --device cpu --precision fp32 --batch-size 2 --num-tokens 4 8 --repeats 1
          --metric-weights random)
    # the smallest converted architecture (its 30.5 M-parameter pixel decoder makes any of them CPU-heavy)
    RELEASED=(--released titok-S-128 --device cpu --precision fp32 --batch-size 1 --num-tokens 128 --repeats 1
              --metric-weights random --no-fid)
fi

if [[ $PART != generator ]]; then
    run tokenizer_only "$PYTHON" scripts/bench_train.py "${TOK[@]}" --compile --tokenizer-only --check-syncs
    run full_objective "$PYTHON" scripts/bench_train.py "${TOK[@]}" --compile --random-lpips --check-syncs
fi
if [[ $PART != tokenizer ]]; then
    run generator_train "$PYTHON" scripts/bench_train.py "${GEN[@]}" --compile --check-syncs
    run generator_sampling "$PYTHON" scripts/bench_sampling.py "${SAMPLE[@]}" --no-cache-max-tokens "$SAMPLE_NO_CACHE"
    run generator_sampling_compiled "$PYTHON" scripts/bench_sampling.py "${SAMPLE[@]}" --compile \
        --no-cache-max-tokens 0
fi
if [[ $PART != generator ]]; then
    run reconstruction_eval "$PYTHON" scripts/bench_eval.py "${EVAL[@]}"
    # a converted released model (docs/released_weights.md): ViT B encoder/decoder + the MaskGIT-VQGAN decoder
    run released_eval "$PYTHON" scripts/bench_eval.py "${RELEASED[@]}"
fi

say "---- results ----"
for r in "${results[@]}"; do echo "$r"; done
say "---- seconds per phase ----"
for p in "${phases[@]}"; do echo "  $p"; done
if ((${#failed[@]})); then
    say "GPU CHECK FAILED: ${failed[*]}"
    exit 1
fi
say "GPU CHECK PASSED (part $PART, device $DEVICE)"
