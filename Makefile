# `make demo` and `make test` set up everything on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/digits

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ntk_scale needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# neural-tangents, the tests' independent oracle, without the duplicate tensorflow wheel (pyproject.toml)
	$(PY) -m pip install --quiet --no-deps 'neural-tangents==0.6.5' 'tf2jax==0.3.8' 'frozendict==2.5.1'
	touch $@

demo: $(VENV)/.installed
	$(PY) main.py --config configs/digits.py --workdir $(WORKDIR)
	$(PY) main.py --config configs/digits.py:adversarial --workdir $(WORKDIR)_adversarial
	$(PY) main.py --config configs/digits.py --config.job=spectrum --workdir $(WORKDIR)
	$(PY) main.py --config configs/digits.py:adversarial --config.job=spectrum --workdir $(WORKDIR)_adversarial
	$(PY) main.py --config configs/digits.py --config.job=report --workdir $(WORKDIR)
	$(PY) main.py --config configs/digits.py:adversarial --config.job=report --workdir $(WORKDIR)_adversarial

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/attack_throughput.py
	$(PY) benchmarks/ntk_engine.py

clean:
	rm -rf $(VENV) workdirs
