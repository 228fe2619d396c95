# Quick start: `make demo` and `make test`; both set up .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo backbone video-demo video-backbone test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(PY) -m adaptformer_jax.demo --config configs/demo.py --workdir runs/demo

# Rebuilds the shipped demo backbone (adaptformer_jax/assets/demo_backbone.md): ~1 h on 2 cores.
backbone: install
	$(PY) -m adaptformer_jax.main --config configs/backbone.py --workdir runs/backbone
	$(PY) -m adaptformer_jax.main --mode export --workdir runs/backbone --out runs/backbone/export
	cp runs/backbone/export/adapter.safetensors adaptformer_jax/assets/demo_backbone.safetensors
	sha256sum adaptformer_jax/assets/demo_backbone.safetensors

# The video demo (configs/video_demo.py): the shipped video backbone adapted with 4 methods x 3
# seeds; no pre-training (docs/video.md).
video-demo: install
	$(PY) -m adaptformer_jax.demo --config configs/video_demo.py --workdir runs/video_demo

# Rebuilds the shipped video backbone (adaptformer_jax/assets/video_backbone.md): ~1 min on 2 cores.
# Same bytes only with the same number of cores (XLA's thread count changes the sums' order).
video-backbone: install
	rm -rf runs/video_backbone
	$(PY) -m adaptformer_jax.main --config configs/video_demo.py:backbone --workdir runs/video_backbone
	$(PY) -m adaptformer_jax.main --mode export --workdir runs/video_backbone --out runs/video_backbone/export
	cp runs/video_backbone/export/adapter.safetensors adaptformer_jax/assets/video_backbone.safetensors
	sha256sum adaptformer_jax/assets/video_backbone.safetensors

# pytest exits 5 when it collects no tests, which fails this target. Two workers
# (pytest-xdist), a test file each at a time: most tests are compiles and
# subprocesses that keep one core busy; the slowest files first (tests/conftest.py), so
# that neither worker idles at the end (2 workers: 647 s, 676 tests, 2-core AMD EPYC,
# near idle, 2026-12-07; 665 s in the default order).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# gpu_check.py wants a GPU (see benchmarks/RESULTS.md); step_profile.py is a diagnosis, not a
# ratio; machine.py and steps.py are helpers.
bench: install
	for b in train_step_vs_torch adapter_vs_full memory input_pipeline checkpoint_manifest; do \
	  echo "== $$b"; $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf runs .pytest_cache
