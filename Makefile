# One-command setup and checks. Everything lives in .venv in the project root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
# Extras to install: e.g. `make install EXTRAS=dev,gpu` (CuPy 14) or
# `EXTRAS=dev,gpu-cudnn` (CuPy 13.6 + cuDNN 8.9 + CUDA 12.4 wheels, NumPy 1.26).
EXTRAS ?= dev
COMMA := ,
STAMP := $(VENV)/.installed-$(subst $(COMMA),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: install test demo lint clean wheels carry bench

install: $(STAMP)

# Rebuilt only when a project file changes, so a second `make install` is fast.
$(STAMP): pyproject.toml setup.py build-constraints.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.3"
	$(PY) -m pip install --quiet --build-constraint build-constraints.txt \
		-e ".[$(EXTRAS)]" $(foreach p,$(PLUGINS),-e $(p))
	$(PY) -c "import smchainer, chainer; print('smchainer', smchainer.__version__, 'chainer', chainer.__version__)"
	touch $(STAMP)

# pytest's exit code 5 (no test collected) is a failure here, never a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "Error: no test ran"; exit 1; fi; exit $$rc

# The CPU benchmark suite, then benchmarks/report.py (tables in benchmarks/README.md, plots in
# benchmarks/results/plots). BENCH_ARGS=--quick: the smoke version, into a temporary folder.
BENCH_ARGS ?=
# The peers (PyTorch eager) come with the bench extra.
bench:
	$(MAKE) install EXTRAS=$(EXTRAS),bench
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check smchainer plugins tests examples benchmarks
	$(VENV)/bin/mypy smchainer

clean:
	rm -rf $(VENV) .pytest_cache

# Train a small VGG on a slice of the shared CIFAR-10, serve it, query it.
demo: install
	$(PY) examples/demo.py

# What a lent GPU machine (Python 3.12, CuPy 14, torch; no internet) lacks, in the ignored
# .carry/ folder that the device call carries: see benchmarks/device/README.md.
CARRY := .carry
SHARED ?= $(or $(SMCHAINER_SHARED),../shared)
wheels: install
	mkdir -p $(CARRY)/wheels
	$(PY) -m pip wheel --quiet --no-deps --build-constraint build-constraints.txt \
		-w $(CARRY)/wheels chainer==7.8.1
	ls -l $(CARRY)/wheels

carry: wheels
	mkdir -p $(CARRY)/cifar10
	cp -u $(SHARED)/data/cifar10/train.zip $(SHARED)/data/cifar10/test.zip $(CARRY)/cifar10/
	@size=$$({ git ls-files -co --exclude-standard -z; printf '%s\0' $(CARRY)/wheels \
		$(CARRY)/cifar10; } | du -sck --files0-from=- | tail -1 | cut -f1); \
	echo "tree + $(CARRY)/wheels + $(CARRY)/cifar10: $$((size / 1024)) MiB of 64"; \
	test $$size -lt 65536 || { echo "Error: over the 64 MiB a device call carries"; exit 1; }
