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

test: $(STAMP) system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/pip install --quiet ruff mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .fedagent .pytest_cache
