# The two commands a new user needs: `make serve` and `make test`. Both set everything up from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VARIANT ?= resnest50
PRECISION ?= fp32
MODEL ?= artifacts/$(VARIANT)-$(PRECISION).onnx
# Optional real weights: make serve CHECKPOINT=https://.../resnest50-528c19ca.pth [SHA256=<64 hex>]
CHECKPOINT ?=
SHA256 ?=
PYTEST_ARGS ?=

.PHONY: serve test install model lb browser redis lint bench bench-protocols peers proto clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Built once and cached: the export writes atomically, so an interrupted build leaves no model behind.
$(MODEL): | $(VENV)/.installed
	$(PY) -m export --variant $(VARIANT) --precision $(PRECISION) --output $@ \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(SHA256),--sha256 $(SHA256))

model: $(MODEL)

serve: $(MODEL)
	RESNEST_MODEL_PATH=$(MODEL) $(VENV)/bin/resnest-serve

# The load-balancer tests need HAProxy (Debian's package), as the compose topology uses; docker-compose
# validates docker-compose.yml where no `docker compose` plugin exists (neither needs a Docker engine).
lb:
	@command -v haproxy >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy docker-compose >/dev/null; }
	@haproxy -v | head -1

# The page's browser test (tests/test_page.py) drives Debian's Chromium through its chromedriver; selenium
# itself comes with the dev extra. Without them the test is skipped outside CI and fails in CI.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@chromedriver --version | head -1

# The shared response cache's tests (tests/test_cache.py) start Debian's redis-server themselves, as a replica
# set's Redis would run beside them.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version | head -1

test: install lb browser redis
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: install $(MODEL)
	$(PY) -m bench.serving --model $(MODEL)

# Each protocol (multipart, OIP HTTP JSON and binary, OIP gRPC) on the same images, in one run.
bench-protocols: install $(MODEL)
	$(PY) -m bench.protocols --model $(MODEL)

# The peers `python -m bench.protocols --peer ...` measures beside this service, each in its own environment.
PEERS ?= bentoml litserve mlserver
peers:
	@for p in $(PEERS); do \
		[ -x .peers/$$p/bin/python ] || $(PYTHON) -m venv .peers/$$p; \
		.peers/$$p/bin/pip install --quiet -r bench/peers/requirements-$$p.txt || exit 1; \
	done

# The gRPC front's descriptor set, from its protocol definition (tests/test_grpc_proto.py checks they agree).
proto: install
	$(PY) -m grpc_tools.protoc -Iservice/grpc --descriptor_set_out=service/grpc/inference.binpb service/grpc/inference.proto

# The realistic model: resnest14d trained here on scikit-learn's digits (about a minute on 2 cores; a rerun with
# the same training config reuses it), exported with its labels and preprocessing. Int8 and benchmarks use it.
.PHONY: digits-model
digits-model: install
	$(PY) -m bench.train_digits --out artifacts/digits --export artifacts/digits/resnest14d-digits-fp32.onnx

clean:
	rm -rf $(VENV) artifacts .pytest_cache
