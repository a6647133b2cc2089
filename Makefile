# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP) system-deps
	$(VENV)/bin/fedagent demo $(ARGS)

# bubblewrap, docker.io, busybox-static, debootstrap, docker-compose and chromium for the sandboxes
# and their tests (apt-get, if missing)
system-deps:
	./scripts/install-system-deps.sh

# Two pytest workers (pytest-xdist), each test module whole on one of them, the tests of a shared
# stack together, the longest modules first (tests/conftest.py): on 2 cores the suite takes about
# 23-28 minutes instead of 34. PYTEST_WORKERS=0 runs it in one process, in the files' own order.
PYTEST_WORKERS ?= 2

test: $(STAMP) system-deps
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/pip install --quiet ruff mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .fedagent .pytest_cache
