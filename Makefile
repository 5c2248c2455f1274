# The README's two commands: `make demo` (set up + run the demo) and `make test`.
# Everything lives in a project-local virtual environment, .venv/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: setup demo test clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(PY) run_extract.py demo-corpus --out $(DEMO_OUT)/corpus
	$(PY) run_extract.py manifest --instructions $(DEMO_OUT)/corpus/instructions.json \
	    --videos $(DEMO_OUT)/corpus/videos --out $(DEMO_OUT)/manifest

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)
