# make test: create or reuse .venv, install the project with its dev extra, run pytest (all but the
# tests that start Ray clusters of their own and the demo-figure tests; make test-multinode and
# make test-demo run those).
# make demo: run the scoring job on the embedded default (local Ray, local files, demo model).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Two pytest workers, each taking whole test files (module fixtures stay in one worker, each
# worker has its own local Ray). Much of the suite waits on one process importing PyTorch, so a
# second worker uses the other core. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: install test test-multinode test-demo test-review-tools demo benchmark gpu-check demo-assets clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

# Every test but those that start Ray clusters of their own (four nodes; a head with the job API; a
# node whose memory monitor kills; README's quick start), those that run jobs as driver processes and
# signal or starve them (about a minute each), and the demo-figure tests; make test-multinode and
# make test-demo run those, and CI runs all.
test: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not multinode and not own_ray and not processes and not demo" $(PYTEST_ARGS)

test-multinode: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "multinode or own_ray or processes" $(PYTEST_ARGS)

# make demo run once: the figures README and docs/ state against what it prints, and every --help
# example that names the demo's files run on its output (about 4 minutes on two idle cores).
test-demo: $(STAMP)
	$(PY) -m pytest -m demo $(PYTEST_ARGS)

# The review export checked by Label Studio's own SDK (the optional 'review' extra, about 0.5 GB
# with its dependencies); without it tests/test_review.py checks the documented schema only.
test-review-tools: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,review]' -c constraints.txt
	$(PY) -m pytest tests/test_review.py $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m jobs.demo

benchmark: $(STAMP)
	$(PY) -m jobs.benchmark

# each forward-pass rewrite on ViT-L-14-336 at 518 px, batch 32, on the GPU (GPU_CHECK_ARGS=--smoke: tiny, CPU)
gpu-check: $(STAMP)
	$(PY) -m jobs.gpu_check --output gpu_check.json $(GPU_CHECK_ARGS)

# Rebuild the packaged demo model from scratch (the README's provenance): pre-train the
# tiny backbone on generated surfaces, then fit prompts and head weights with jobs.train
# on textures the demo images do not use (the demo scores wood, fabric, concrete, tiles).
DEMO_FIT_TEXTURES ?= metal leather marble carpet
DEMO_BACKBONE_TEXTURES ?= metal,leather,marble,carpet,mesh,cork
demo-assets: $(STAMP)
	$(PY) -m jobs.pretrain_demo_backbone --textures $(DEMO_BACKBONE_TEXTURES) \
	    --output headclip/assets/demo-backbone.safetensors
	rm -rf build/demo-fit build/train-runs/demo-fit
	$(PY) -m jobs.make_synthetic --root build/demo-fit --textures $(DEMO_FIT_TEXTURES) --per-class 60 --size 256
	$(PY) -m jobs.train --data build/demo-fit --workers 0 --backbone HeadCLIP-Tiny \
	    --pretrained headclip:demo-backbone.safetensors --image-size 224 --epochs 8 \
	    --name demo-fit --storage-path build/train-runs --output headclip/assets/demo.safetensors

clean:
	rm -rf $(VENV) out demo-data .pytest_cache
