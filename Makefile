# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else is a building block they call.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Stamp the venv with the pyproject it was built from, so editing dependencies
# reinstalls and an unchanged checkout costs nothing.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: venv demo test test-fast lint controlplane cluster bench bench-pruning bench-families bench-coverage bench-dynamic bench-serving bench-split bench-operator bench-chaos crd clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[compressor,operator,serving,dev,plot]'
	rm -f $(VENV)/.installed-* && touch $@

# Kubernetes control plane + helm, built from the Go module proxy and cached
# outside the checkout (first run on a machine: see README for the time).
controlplane:
	scripts/build-controlplane.sh

demo: venv
	$(BIN)/python examples/digits/build.py --out out/demo/data
	$(BIN)/edgeslim compress examples/digits/digits.yaml --output out/demo

# Two workers: the control-plane tests on one (all of them, in file order; see
# tests/conftest.py), everything else on the other while those wait on pods.
test: venv controlplane
	$(BIN)/ruff check edgeslim tests bench examples
	$(BIN)/pytest -ra --durations=30 -n 2 --dist loadscope --no-loadscope-reorder

# Everything except the control-plane tests; for a quick loop while editing.
# (The chart tests still need the cached helm binary, hence controlplane.)
test-fast: venv controlplane
	$(BIN)/pytest -ra -m "not cluster"

lint: venv
	$(BIN)/ruff check edgeslim tests bench examples
	$(BIN)/ruff format --check edgeslim tests bench examples

# A control plane, node agent and S3 server in the foreground for trying the
# operator by hand; Ctrl-C stops everything.
cluster: venv controlplane
	$(BIN)/python -m tests.cluster

bench: venv
	$(BIN)/python bench/compression.py

# Structured pruning against Torch-Pruning on five architectures (about 25 minutes
# on two cores; `--quick` via ARGS=--quick for one sparsity and fewer epochs).
bench-pruning: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/pruning.py $(ARGS)

# Families the groups were not tuned on (ViT, Swin, MobileViT, Llama) through the whole
# pipeline (about 30 minutes: the Llama peer runs into its 15-minute deadline).
bench-families: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/families.py $(ARGS)

# Coverage only (no training) on SwiftFormer, LeViT, FocalNet and CvT against
# Torch-Pruning (about 7 minutes: its FocalNet run meets the 5-minute deadline).
bench-coverage: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/coverage.py $(ARGS)

# Coverage only (no training) of exports with a dynamic batch and sequence, from
# torch's TorchScript and dynamo exporters (DeBERTa, Llama, ConvNeXt, Swin).
bench-dynamic: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/dynamic_exports.py $(ARGS)

bench-serving: venv
	$(BIN)/python bench/serving.py

bench-split: venv
	OMP_NUM_THREADS=1 $(BIN)/python bench/split.py $(ARGS)

# spec.optimize against NNCF accuracy control, INC tuning and Olive auto-opt (issue
# 10). The peers get their own venvs (bench/.venv-peers/), never the project's.
.PHONY: bench-optimize bench-optimize-peers
bench-optimize-peers:
	PYTHON=$(PYTHON) bench/peers/install.sh

bench-optimize: venv bench-optimize-peers
	OMP_NUM_THREADS=1 $(BIN)/python bench/optimize.py $(ARGS)

bench-operator: venv controlplane
	$(BIN)/python bench/operator_scale.py --n 100 --n 1000

# Faults (operator SIGKILL, S3 down mid-upload, kube-apiserver restart, a
# corrupted artifact) on the test bed: duplicate Jobs, lost results, partial
# artifacts, objects not final.
bench-chaos: venv controlplane
	$(BIN)/python bench/chaos.py

# Regenerate the CRD (and the chart's copy) from the pydantic models.
crd: venv
	$(BIN)/edgeslim crd --output crds/compressedmodel.yaml --policy-output crds/compressionpolicy.yaml --chart charts/edgeslim

clean:
	rm -rf out .pytest_cache .ruff_cache
