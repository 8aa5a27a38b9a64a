# One-command setup and checks. Everything lives in .venv in the project root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo lint clean

install: $(STAMP)

# Rebuilt only when a project file changes, so a second `make install` is fast.
$(STAMP): pyproject.toml build-constraints.txt $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.3"
	$(PY) -m pip install --quiet --build-constraint build-constraints.txt \
		-e ".[dev]" $(foreach p,$(PLUGINS),-e $(p))
	$(PY) -c "import smchainer, chainer; print('smchainer', smchainer.__version__, 'chainer', chainer.__version__)"
	touch $(STAMP)

# pytest's exit code 5 (no test collected) is a failure here, never a pass.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "Error: no test ran"; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check smchainer plugins tests

clean:
	rm -rf $(VENV) .pytest_cache

# Until the trainer lands, the demo lists what a server would load.
demo: install
	$(VENV)/bin/smchainer plugins
