# facestream developer commands. `make install` then `make test` is all a new user needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CLIP ?= ../shared/data/videos/lp_d3.mp4
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test test-all bench lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python  ## create .venv and install facestream with the dev tools (CPU)
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/facestream --version

run: ## segment a real clip with the default weights (FACESTREAM_WEIGHTS or --weights)
	$(BIN)/facestream segment $(CLIP) --out out/overlay.mp4 --masks out/masks --report out/report.json

test: ## the fast default suite (CPU, tiny models, real clips from ../shared/data)
	$(BIN)/python -m pytest -m "not slow and not integration and not gpu and not tensorrt" -q

test-all: ## every test this machine can run
	$(BIN)/python -m pytest -q

bench: ## per-stage cost and end-to-end FPS per scheduler -> bench/bench.json + bench/bench.png
	$(BIN)/facestream bench --clip $(CLIP) --out bench --threads 2

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engines models training facestream

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf out bench .pytest_cache .mypy_cache
