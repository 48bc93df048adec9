# make venv | make demo | make test     (needs only python3 and make)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: nothing installed after it may pull another torch build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv system demo test clean viz-deps arm-root

# transformers 4.x apart from the venv's 5.x (tests/test_hf_tracer.py runs it with PYTHONPATH=.venv/hf4): HFTracer
# (transformers.utils.fx) is gone in 5. Only what must differ from the venv's packages, no deps (never a torch/numpy);
# installed once, keyed by the pins (a stamp per pin set), offline after that.
HF4_PINS := transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2 requests==2.34.2 certifi==2026.10.19.post1 \
	charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0
HF4_STAMP := $(VENV)/hf4/.installed-$(shell echo '$(HF4_PINS)' | cksum | cut -d' ' -f1)

venv: $(VENV)/.installed $(HF4_STAMP)

# system packages the tests need: qemu-user runs ONNX Runtime as other CPUs (AVX2, SSE4, Arm). CI runs as root.
system:
	@command -v qemu-x86_64 >/dev/null || { apt-get update && apt-get install -y --no-install-recommends qemu-user; }

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev]" $(TORCH)
	touch $@

$(HF4_STAMP): | $(VENV)/.installed
	rm -rf $(VENV)/hf4
	$(BIN)/python -m pip install --no-deps --target $(VENV)/hf4 $(HF4_PINS)
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
