# make venv | make demo | make test     (needs only python3 and make)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: nothing installed after it may pull another torch build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv system demo test clean viz-deps arm-root

venv: $(VENV)/.installed

# system packages the tests need: qemu-user runs ONNX Runtime as other CPUs (AVX2, SSE4, Arm). CI runs as root.
system:
	@command -v qemu-x86_64 >/dev/null || { apt-get update && apt-get install -y --no-install-recommends qemu-user; }

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]" $(TORCH)
	touch $@

demo: venv
	$(BIN)/fxquant demo

test: venv system viz-deps arm-root
	$(BIN)/python -m pytest -n 2 tests

# an Arm64 Python with numpy and onnxruntime, which qemu-aarch64 runs as Arm CPUs (fxquant.check.CPUS)
arm-root: venv system
	@test -f $(VENV)/aarch64/.ready || $(BIN)/python -m fxquant.tools.aarch64_root $(VENV)/aarch64

# the viewer's tests drive Debian's chromium (Playwright, never a downloaded browser) and Graphviz's dot
viz-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/dot ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium graphviz; fi

clean:  # build artefacts only; `rm -rf .venv` for a new environment
	rm -rf build dist *.egg-info
