# `make demo` and `make test` set up .venv themselves. torch is pinned explicitly: an unpinned torch may pull a
# multi-GB CUDA build. Pass extra pip arguments for torch (e.g. a CPU wheel index) with PIP_TORCH_ARGS=...
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all lint clean

setup: $(STAMP)

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
