# `make demo` and `make test` set up .venv themselves. torch is pinned explicitly: an unpinned torch may pull a
# multi-GB CUDA build. Pass extra pip arguments for torch (e.g. a CPU wheel index) with PIP_TORCH_ARGS=...
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-slow test-all lint clean

setup: $(STAMP) browser

# The chat page's test (tests/test_chat_page.py) drives the system's Chromium through its chromedriver. Installed
# here when missing and possible (root with apt-get, e.g. Debian's chromium + chromium-driver); a no-op when both
# are there; otherwise the test is skipped and says why.
browser:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || \
	      command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; }; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for the browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	      >/dev/null; } || echo "could not install chromium: the browser test will be skipped"; \
	else echo "no chromium/chromedriver, and no root apt-get to install them: the browser test will be skipped"; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# PyTriton (for the Triton test) pins numpy<2 and, through tritonclient, protobuf<7; transformers' sentencepiece
	# conversion needs the protobuf 7 runtime, and tritonclient works with it (tests/test_triton.py), so it goes last.
	$(BIN)/python -m pip install --quiet "nvidia-pytriton>=0.5"
	$(BIN)/python -m pip install --quiet "protobuf>=7"
	touch $(STAMP)

# the trained tiny model shipped in the package (dynllava train-tiny, seed 0) and a picture from its task
SHAPES := dynllava/assets/shapes-tiny
DEMO_PROMPT := --image $(SHAPES)/example.png --prompt "How many shapes are there?" --max-new-tokens 16

demo: setup
	rm -rf demo-out
	$(BIN)/dynllava generate $(SHAPES) $(DEMO_PROMPT)
	$(BIN)/dynllava export $(SHAPES) -o demo-out/shapes-onnx
	$(BIN)/dynllava generate demo-out/shapes-onnx --backend onnxruntime $(DEMO_PROMPT)
	printf 'How many shapes are there?\nHow many shapes do you see?\n' | $(BIN)/dynllava chat demo-out/shapes-onnx --image $(SHAPES)/example.png --max-new-tokens 16
	$(BIN)/dynllava eval $(SHAPES) --limit 80
	$(BIN)/dynllava init-tiny demo-out/tiny
	$(BIN)/dynllava flops --preset llava-1.5-7b
	$(BIN)/dynllava doctor

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check dynllava tests
	$(BIN)/mypy dynllava/engine dynllava/kernels dynllava/runtime/backends/tensorrt.py dynllava/doctor.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
