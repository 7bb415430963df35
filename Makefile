# facestream developer commands. `make install` then `make test` is all a new user needs.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CLIP ?= ../shared/data/videos/lp_d3.mp4
HOST ?= 127.0.0.1
PORT ?= 8000
MEDIAPIPE_VENV ?= .venv-mediapipe
RUNS ?= runs
ETAS ?= 0.04 0.06 0.14

.PHONY: install run segment test test-integration test-all bench bench-service lint format clean teacher-mediapipe train-all evaluate-shipped crossval-B bench-gpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python  ## create .venv and install facestream with the dev tools (CPU)
	$(BIN)/pip install -c requirements/runtime.txt -e '.[dev,train]'  # the images' pins (requirements/runtime.txt)
	$(BIN)/facestream --version

run: ## start the service on http://$(HOST):$(PORT)/ (browser page, /ws, /streams, /metrics, /docs)
	$(BIN)/facestream serve --host $(HOST) --port $(PORT)

segment: ## segment a real clip with the default weights into out/ (overlay video, masks, report)
	$(BIN)/facestream segment $(CLIP) --out out/overlay.mp4 --masks out/masks --report out/report.json

test: ## the fast default suite (CPU, tiny models, real clips from ../shared/data)
	$(BIN)/python -m pytest -m "not slow and not integration and not gpu and not tensorrt" -q

test-integration: ## real peers: service over TCP, Prometheus, RTSP server, headless Chromium (.ci/install-peers first)
	$(BIN)/python -m pytest -m "integration and not gpu and not tensorrt" -q

test-all: ## every test this machine can run
	$(BIN)/python -m pytest -q

bench: ## per-stage cost and end-to-end FPS per scheduler -> bench/bench.json + bench/bench.png
	$(BIN)/facestream bench --clip $(CLIP) --out bench --threads 2

bench-service: ## the service under 1 and 4 streaming clients (300 frames, 30 FPS, 640x480) -> bench/service.json + .png
	$(BIN)/facestream bench-service --clip $(CLIP) --out bench --threads 2

teacher-mediapipe: $(MEDIAPIPE_VENV)/bin/python  ## MediaPipe Face Mesh labelling teacher in its own .venv-mediapipe (numpy<2)

$(MEDIAPIPE_VENV)/bin/python:
	$(PYTHON) -m venv $(MEDIAPIPE_VENV)
	$(MEDIAPIPE_VENV)/bin/pip install --quiet --upgrade pip
	$(MEDIAPIPE_VENV)/bin/pip install --quiet mediapipe==0.10.21 || { rm -rf $(MEDIAPIPE_VENV); exit 1; }
	$(MEDIAPIPE_VENV)/bin/python -c "import mediapipe; print('mediapipe', mediapipe.__version__)"

train-all: teacher-mediapipe ## reproduce models/weights from scratch (about 4 h on 2 cores; rerun to resume)
	$(BIN)/facestream train segmentation --out $(RUNS)/segmentation --threads 2
	$(BIN)/facestream train flow --segmentation $(RUNS)/segmentation/segmentation.safetensors --out $(RUNS)/flow --threads 2
	$(BIN)/facestream train ship --runs $(RUNS) --out models/weights
	$(BIN)/facestream train correction --weights models/weights --out $(RUNS)/correction --threads 2
	$(BIN)/facestream train ship --runs $(RUNS) --out models/weights
	# int8 activation ranges of the shipped corrector (set A pairs), judged against float32 on set B
	$(BIN)/facestream train calibrate --weights models/weights --out models/weights --threads 2
	# the shipped DVSNet head and policies learnt from set-B tables warped without the corrector
	# (--no-correct); it changes their inputs only through where the tracked non-key crop lies.
	# Trained on corrected tables instead, both were worse on set B (README, "Where RL stands").
	# The DVSNet baseline learns from B played forwards and backwards (--reverse), as the policies
	# do (better on B than forwards only); the policies' fixed trunk starts from a head trained on
	# B forwards only (dvsnet-trunk), the shipped policies' recipe. The policies also learn from B
	# mirrored left to right (--mirror), and their FC3 also sees the trunk head's predicted mIoU of the
	# warped frame (--quality); both adopted on held-out people of B by rules written before their runs
	# (docs/training-history.md)
	$(BIN)/facestream train dvsnet --weights models/weights --out $(RUNS)/dvsnet-trunk --threads 2 --no-correct
	$(BIN)/facestream train dvsnet --weights models/weights --out $(RUNS)/dvsnet --threads 2 --no-correct --reverse
	for eta in $(ETAS); do \
		$(BIN)/facestream train policy --weights models/weights --eta $$eta --episodes 4800 \
			--init-trunk $(RUNS)/dvsnet-trunk/dvsnet.safetensors --freeze-trunk --cues residual_face,residual_parts --reverse --mirror --quality --no-correct \
			--out $(RUNS)/policy-eta$$eta --threads 2 || exit 1; \
	done
	$(BIN)/facestream train ship --runs $(RUNS) --out models/weights --etas "$$(echo $(ETAS) | tr ' ' ,)"

SHIPPED_POLICIES = --policy models/weights/policy.safetensors $(foreach eta,$(filter-out 0.04,$(ETAS)),--policy models/weights/policy-eta$(eta).safetensors)

evaluate-shipped: ## the set-C evaluation of the shipped weights -> docs/evaluation, and from 8 start frames -> docs/evaluation-starts
	$(BIN)/facestream evaluate --manifest default --set C --schedulers all --sweep --out docs/evaluation \
		$(SHIPPED_POLICIES) --cache $(RUNS)/pairs-C-full --threads 2
	$(BIN)/facestream evaluate --manifest default --set C --schedulers all --sweep --out docs/evaluation-starts \
		$(SHIPPED_POLICIES) --cache $(RUNS)/pairs-C-full --threads 2 --starts 8 --start-step 8

CV = $(RUNS)/cv
CV_POLICY = --episodes 4800 --freeze-trunk --cues residual_face,residual_parts --reverse --mirror --quality --no-correct --threads 2

crossval-B: ## leave-one-person-out CV of the schedulers on set B (two DVSNet heads + eta policies per fold; about 3 h with the mirrored tables) -> docs/evaluation-cv
	$(BIN)/facestream crossval manifests --set B --runs $(CV)
	for m in $(CV)/m-*.json; do \
		k=$$(basename $$m .json); k=$${k#m-}; \
		$(BIN)/facestream train dvsnet --manifest $$m --weights models/weights --out $(CV)/$$k/dvsnet-trunk --threads 2 --no-correct || exit 1; \
		$(BIN)/facestream train dvsnet --manifest $$m --weights models/weights --out $(CV)/$$k/dvsnet --threads 2 --no-correct --reverse || exit 1; \
		for eta in $(ETAS); do \
			$(BIN)/facestream train policy --manifest $$m --weights models/weights --eta $$eta \
				--init-trunk $(CV)/$$k/dvsnet-trunk/dvsnet.safetensors $(CV_POLICY) --out $(CV)/$$k/eta$$eta || exit 1; \
		done; \
	done
	$(BIN)/facestream crossval evaluate --runs $(CV) --cache $(RUNS)/pairs-cv --out docs/evaluation-cv

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engines models training facestream service

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf out bench .pytest_cache .mypy_cache

bench-gpu: ## GPU per-stage FPS (TensorRT FP16, torch-cuda; 512², batch 1 and 8) -> bench/gpu/gpu.json + .png; exits 2 without a GPU
	$(BIN)/python -m facestream.engines.bench_gpu --out bench/gpu

.PHONY: lint-deploy requirements

lint-deploy: ## lint docker/ and deploy/ without Docker or a cluster (pip install -e '.[deploy]' and .ci/install-peers first)
	$(BIN)/hadolint --failure-threshold info docker/Dockerfile.cpu docker/Dockerfile.gpu deploy/rtsp-source/Dockerfile
	shellcheck docker/entrypoint-gpu.sh
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/docker-compose.yml deploy/compose/docker-compose.gpu.yml
	$(BIN)/kubernetes-validate --strict deploy/k8s/*.yaml
	promtool check config deploy/compose/prometheus.yml
	$(BIN)/python -m pytest tests/test_deploy.py -m "integration or not integration" -q

requirements: ## pin the runtime dependencies installed in .venv into requirements/runtime.txt (the images' pip constraints)
	$(BIN)/python requirements/freeze.py > requirements/runtime.txt.tmp
	mv requirements/runtime.txt.tmp requirements/runtime.txt
