# make run: set up .venv and run the mtcars MLP study on the embedded SQLite/MLflow defaults.
# make test: set up .venv and run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip never swaps it: override for another build,
# e.g. `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" run`.
TORCH ?= torch==2.13.0

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/tuner launch studies/cars_mlp.toml

# Two processes (pytest-xdist), a test module per process: most tests wait on subprocesses,
# servers and kills, so two halve the wall time on two cores; --dist loadscope keeps a module's
# shared fixtures (a launched study, a browser) in one process.
test: install
	$(PY) -m pytest -n 2 --dist loadscope

lint: install
	$(VENV)/bin/ruff check tuner tests benchmarks
	$(VENV)/bin/mypy tuner benchmarks

clean:
	rm -rf $(VENV) studies/*.db studies/*.db-* studies/*.db.lock mlflow.db mlartifacts .pytest_cache
