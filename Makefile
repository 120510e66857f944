# iris-diffusion: make demo | make test | make bench | make sweep | make lint | make browser-deps | make colab-links
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow browser-deps bench sweep lint readme-figure colab-links clean

# clean-fid (the `metrics` extra) goes in without its torchvision requirement, which would replace
# torch; iris-diffusion imports only its torchvision-free parts (pipeline/check/inception.py)
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,export,bench]"
	$(PY) -m pip install --quiet --no-deps "clean-fid>=0.1.35"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/iris-demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# What the browser test (tests/test_serve_browser.py, part of test-slow; skipped without them) needs:
# Gradio (the web extra), Playwright, and a Chromium: Debian's, installed by apt-get when run as root
# where apt-get exists. Otherwise install one yourself and/or point IRIS_CHROMIUM at it, or run
# `.venv/bin/playwright install chromium` where the internet is reachable. Not part of `make test`:
# it takes minutes, needs root for apt-get, and `make test` skips the slow browser test anyway.
browser-deps: $(STAMP)
	$(PY) -m pip install --quiet -e ".[web]" "playwright>=1.40"
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	else \
		echo "no chromium found and not root with apt-get: install chromium and/or set IRIS_CHROMIUM=/path/to/it," \
			"or run $(VENV)/bin/playwright install chromium" >&2; exit 2; \
	fi

# every benchmark in quick mode; their summary table replaces the README's (between bench-summary markers)
bench: $(STAMP)
	$(PY) benchmarks/run_all.py --quick
	$(PY) benchmarks/readme_block.py bench-summary benchmarks/results/summary.md

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
