# The README's two commands: `make demo` (set up + run the demo) and `make test`.
# Everything lives in a project-local virtual environment, .venv/; the demo writes only demo_out/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
DEMO_VIDEOS ?= 960
DEMO_STEPS ?= 3000
# the demo model: tiny LM, a small VideoSummary over demo-tiny's 37 x 64 tokens per frame
DEMO_MODEL := --preset tiny --vocab-size 1000 --queries 16 --token-mlp
DEMO_TRAIN := --steps $(DEMO_STEPS) --batch-size 16 --lr 2e-3 --lm-lr-ratio 0.05 --text-only-fraction 0.1 \
	--feature-cache ram --log-every 50 --seed 0 --threads 1
DEMO_DATA = --manifest $(DEMO_OUT)/manifest --store $(DEMO_OUT)/store.zarr

.PHONY: setup demo demo-train demo-run demo-run-cinego test clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,web]'
	touch $@

demo: setup
	$(PY) run_extract.py demo-corpus --out $(DEMO_OUT)/corpus --videos $(DEMO_VIDEOS) --seed 0
	$(PY) run_extract.py manifest --instructions $(DEMO_OUT)/corpus/instructions.json \
	    --videos $(DEMO_OUT)/corpus/videos --out $(DEMO_OUT)/manifest --val-fraction 0.1
	$(PY) run_extract.py extract --manifest $(DEMO_OUT)/manifest --store $(DEMO_OUT)/store.zarr \
	    --encoder demo-tiny --pretrained none
	$(PY) run_extract.py status --store $(DEMO_OUT)/store.zarr
	$(MAKE) --no-print-directory -j2 --output-sync=target demo-train
	$(PY) run_extract.py demo-corpus --out $(DEMO_OUT)/heldout --videos 3 --seed 1
	$(PY) run_train.py chat --run $(DEMO_OUT)/run --video $$(ls $(DEMO_OUT)/heldout/videos/*.mp4 | head -1) \
	    --question "What colour is the moving object?"
	$(PY) run_train.py describe --run $(DEMO_OUT)/run --videos $(DEMO_OUT)/heldout/videos \
	    --question "In which direction does the object move?"
	$(PY) run_train.py eval --run $(DEMO_OUT)/run --labels $(DEMO_OUT)/corpus/labels.json \
	    --table --compare $(DEMO_OUT)/run-cinego

# the full model and the cinego summary with the same budget, side by side (one core each);
# --output-sync (GNU make >= 4) prints each run's output when that run ends
demo-train: demo-run demo-run-cinego

demo-run:
	$(PY) run_train.py train $(DEMO_DATA) --out $(DEMO_OUT)/run $(DEMO_MODEL) \
	    --summary-layers 2 --summary-heads 4 --combine concat $(DEMO_TRAIN)

demo-run-cinego:
	$(PY) run_train.py train $(DEMO_DATA) --out $(DEMO_OUT)/run-cinego $(DEMO_MODEL) --summary cinego $(DEMO_TRAIN)

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)
