# One-command set-up, demo and tests. torch==2.13.0 is installed first: on the project's CPU machines it is
# a local CPU build; any other torch requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: venv demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	rm -rf $(DEMO)
	$(BIN)/k2quant make-tiny $(DEMO)/K2-fp8 --format fp8
	$(BIN)/k2quant inspect $(DEMO)/K2-fp8
	$(BIN)/k2quant convert $(DEMO)/K2-fp8 $(DEMO)/K2-int4 --to int4
	$(BIN)/k2quant inspect $(DEMO)/K2-int4
	$(BIN)/k2quant verify $(DEMO)/K2-fp8 $(DEMO)/K2-int4
	$(BIN)/k2quant convert $(DEMO)/K2-int4 $(DEMO)/K2-bf16 --to bf16
	$(BIN)/k2quant convert $(DEMO)/K2-bf16 $(DEMO)/K2-fp8-again --to fp8
	$(BIN)/k2quant convert $(DEMO)/K2-fp8 $(DEMO)/K2-bf16-from-fp8 --to bf16
	$(BIN)/k2quant convert $(DEMO)/K2-bf16-from-fp8 $(DEMO)/K2-int4-kimi --to int4 --scale-rule kimi
	$(BIN)/k2quant convert $(DEMO)/K2-int4-kimi $(DEMO)/K2-fp8-from-int4 --to fp8
	$(BIN)/k2quant inspect $(DEMO)/K2-int4-kimi

test: venv
	$(BIN)/ruff check k2quant tests bench
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
