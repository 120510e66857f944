# iris-diffusion: make demo | make test | make bench | make sweep | make lint | make colab-links
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench sweep lint readme-figure colab-links clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/iris-demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

sweep: $(STAMP)
	$(PY) benchmarks/strength_sweep.py --out runs/sweep --overwrite

# README pictures: the demo's prior / VAE-seeded / from-noise rows and headline table, copied into
# README.md (runs the demo once if runs/demo has none), and the strength-sweep plot when a sweep has been run.
runs/demo/summary.png: | $(STAMP)
	$(VENV)/bin/iris-demo --out runs/demo --overwrite

readme-figure: runs/demo/summary.png
	mkdir -p docs
	cp runs/demo/summary.png docs/demo_summary.png
	cp runs/demo/headline.md docs/demo_headline.md
	$(PY) benchmarks/readme_block.py demo-headline docs/demo_headline.md
	if [ -f runs/sweep/sweep.json ]; then cp runs/sweep/strength_sweep.png runs/sweep/strength_grid*.png runs/sweep/sweep.md runs/sweep/sweep.json docs/; fi

# The Colab badges and the notebooks' REPO_URL, from URL, else the origin remote if it is on GitHub, else
# pyproject.toml's [project.urls] Repository (standard library only: needs no install).
colab-links:
	python3 colab/set_repo.py $(URL)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
