# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY      := .venv/bin/python
# OpenMP busy-waiting makes torch crawl when another process shares these 2 cores.
export OMP_WAIT_POLICY ?= PASSIVE
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# Pin the CPU build that lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m gradshape.demo

test: install
	$(PY) -m pytest -q

lint: install
	.venv/bin/ruff check src tests benchmarks experiments

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache
