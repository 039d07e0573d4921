# One-command set-up, demo and tests. torch==2.13.0 is installed first: on the project's CPU machines it is
# a local CPU build; any other torch requirement would pull a multi-GB CUDA build.
# make venv/demo/test install the locked set (constraints.txt); make test-latest the newest releases.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
DEMO := demo
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-latest lock bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
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

# The newest release of every dependency, in its own venv, then the suite. torch stays pinned (see above: a
# newer one is a multi-GB CUDA build here); TORCH=torch==2.14.1 make test-latest tries another. Run it
# before bumping constraints.txt, and whenever an upstream release lands.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet $(TORCH)
	echo '$(TORCH)' > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e '.[test]'
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(transformers|accelerate|compressed-tensors|lm.eval|numba|numpy|safetensors|torch)=='
	$(LATEST)/bin/ruff check k2quant tests bench
	$(LATEST)/bin/python -m pytest -q

# After a green test-latest: make its versions the locked set.
lock:
	test -x $(LATEST)/bin/pip || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,/^# make test-latest with/p' constraints.txt; \
	  $(LATEST)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) $(DEMO) .pytest_cache
