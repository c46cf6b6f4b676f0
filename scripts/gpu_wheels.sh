#!/usr/bin/env bash
# Wheels for an offline GPU machine that already has torch, lightning, torchmetrics, accelerate, timm and
# scikit-image: the project's other runtime packages, without their (already present) dependencies, into .whl/
# (git-ignored). scripts/gpu_check.sh installs them with `pip install --no-index --no-deps .whl/*.whl`.
#
# Versions are pinned to the ones the test suite runs with: tokenizer/quantizer.py patches internals of
# vector-quantize-pytorch (pyproject.toml pins it to the same version), and an unpinned download could bring a
# release where they moved. A rerun first deletes the wheels its previous run downloaded (listed in
# .whl/.gpu_wheels) and nothing else; another version of one of these packages that it did not download stops it,
# naming the file (`pip install .whl/*.whl` refuses two versions of one package).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PINS=(
    vector-quantize-pytorch==1.32.0 einops==0.8.2 einx==0.4.3 loguru==0.7.3 torch-einops-utils==0.2.0
    frozendict==2.5.1 webdataset==1.0.2 braceexpand==0.1.7 lpips==0.1.4 torch-fidelity==0.4.0 jsonargparse==4.53.0
)
MANIFEST=.whl/.gpu_wheels  # the wheels this script put into .whl/, one file name per line
mkdir -p .whl
if [[ -f "$MANIFEST" ]]; then
    while IFS= read -r name; do
        if [[ -n "$name" && "$name" != */* ]]; then rm -f -- ".whl/$name"; fi
    done <"$MANIFEST"
    rm -f -- "$MANIFEST"
fi

download=$(mktemp -d .whl/.download.XXXXXX)
trap 'rm -rf -- "$download"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$download" "${PINS[@]}"

# wheel file names start with the distribution name (normalized: lower case, '_' for '-') and the version
for wheel in "$download"/*.whl; do
    name=${wheel##*/}
    for other in .whl/"${name%%-*}"-*.whl; do
        if [[ -e "$other" && "${other##*/}" != "$name" ]]; then
            echo "error: $other is another version of ${name%%-*} than the pinned $name and was not downloaded" \
                "by this script; remove it or move it out of .whl/ (pip install .whl/*.whl refuses both)" >&2
            exit 1
        fi
    done
done
for wheel in "$download"/*.whl; do
    name=${wheel##*/}
    if [[ -e ".whl/$name" ]]; then
        continue  # the same wheel, put there by someone else: theirs to keep (and not listed for deletion)
    fi
    mv -- "$wheel" ".whl/$name"
    echo "$name" >>"$MANIFEST"
done
ls -la .whl/*.whl
du -sh .whl
