# Two commands do everything: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean bench docs

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned to the local CPU wheel first so that nothing can pull a CUDA build (lightning, an optional
# extra installed here so its integration is tested, needs no other torch).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,lightning,docs,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradcond run --out runs --force
	@$(BIN)/python -m gradcond.report.browser runs/demo/report.html || echo "browser check of the report failed"

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "slow or not slow"

# The documentation site (MkDocs + mkdocstrings, API reference from the docstrings) into site/; warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# The benchmarks that report a README table (benchmarks/_readme.py: a script's markdown_table()), each in its own
# process; rewrites the README's performance section (between <!-- bench:start --> and <!-- bench:end -->).
bench: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=src $(BIN)/python benchmarks/_readme.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
