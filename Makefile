# The two commands of the README: `make book` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test lint notebooks bench gpu-check check-book clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# stardist ships the real DSB 2018 nuclei image; its heavy dependencies are not needed
	$(PY) -m pip install --quiet --no-deps stardist==0.9.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	# The chapters run in this virtual environment's kernel, whatever else is installed.
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (minunet)" >/dev/null
	# tqdm.auto warns once that notebook widgets are missing; the book shows no progress bars.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" JUPYTER_PATH="$(CURDIR)/$(VENV)/share/jupyter" \
	  PYTHONWARNINGS="ignore:IProgress not found" \
	  $(VENV)/bin/jupyter-book build . --all --warningiserror --keep-going --path-output .
	# The executed chapters as plain notebooks, in notebooks/ and in the site (no re-run).
	$(PY) book/export_notebooks.py --html _build/html
	@echo "Book written to _build/html/index.html"

check-book: $(STAMP)
	$(PY) -m pytest -q tests/test_book_browser.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

notebooks: $(STAMP)
	# Every chapter as an executed notebook in notebooks/ (outputs from the last book build
	# when it is up to date, else each chapter runs in an empty folder outside the repository).
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (minunet)" >/dev/null
	$(PY) book/export_notebooks.py

# Speed against PyTorch (a few minutes); the accuracy runs take ~20 minutes more:
#   $(PY) benchmarks/bench_segmentation.py synthetic   (also dsb2018, isbi2012)
# (OpenBLAS picks its own kernel: variables that force one are unset for these commands only.)
bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/bench_kernels.py --threads 2
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/bench_unet_step.py --threads 2 \
		--repeats 7 --ladder depth5_base32_4x128_same

# On a machine with an NVIDIA GPU and CuPy: the GPU tests and the GPU benchmark.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf _build notebooks .pytest_cache
