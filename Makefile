# The two commands of the README: `make book` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test lint notebooks bench check-book clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# stardist ships the real DSB 2018 nuclei image; its heavy dependencies are not needed
	$(PY) -m pip install --quiet --no-deps stardist==0.9.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going --path-output .
	@echo "Book written to _build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

notebooks: $(STAMP)
	mkdir -p notebooks
	$(VENV)/bin/jupytext --to ipynb --output-dir notebooks book/*.md 2>/dev/null || \
	  for f in book/*.md; do $(VENV)/bin/jupytext --to ipynb -o notebooks/$$(basename $${f%.md}).ipynb $$f; done

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf _build notebooks .pytest_cache
