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

.PHONY: setup demo demo-train demo-run demo-run-cinego demo-pairs test clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,web]'
	touch $@

demo: setup
	$(PY) run_extract.py demo-corpus --out $(DEMO_OUT)/corpus --videos $(DEMO_VIDEOS) --seed 0 --pairs
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

# Issue 16: the query-free connectors with the demo's budget, after `make demo` (its store and its
# two runs); a target of its own, as six trainings do not fit the demo's 15 minutes on 2 cores (not
# timed yet). The same data and $(DEMO_TRAIN), and $(DEMO_MODEL) less the queries' flags (--queries,
# --token-mlp: these kinds refuse them, as they do --summary-layers, --summary-heads and --combine;
# a changed --queries in DEMO_MODEL fails loudly here); two runs at a time like demo-train, then one
# table over all six runs: accuracy by question type, connector, video tokens per video, training
# samples/s (`run_train.py eval --table --compare`). demo-tiny gives F=8 frames of T=37 tokens (CLS
# + a 6x6 patch grid), so video tokens: mean 37; concat 32 (--concat-tokens 4: each frame's grid
# averaged to 2x2, as many tokens as the full run's 2 x 16 queries, and where the object is stays
# visible, which one CLS token per frame need not show); vchatgpt 8 + 36 = 44; pool 8 x 3 x 3 = 72
# (--pool-stride 2, the default); beside full 32 and cinego 16.
.PHONY: demo-connectors demo-connectors-train
CONNECTORS := mean concat vchatgpt pool
CONNECTOR_MODEL = $(filter-out --token-mlp,$(subst --queries 16,,$(DEMO_MODEL)))
CONNECTOR_FLAGS_concat := --concat-tokens 4
CONNECTOR_FLAGS_pool := --pool-stride 2

demo-connectors: setup
	@test -d $(DEMO_OUT)/store.zarr -a -d $(DEMO_OUT)/run -a -d $(DEMO_OUT)/run-cinego || \
	    { echo "demo-connectors: run 'make demo DEMO_OUT=$(DEMO_OUT)' first (its store and two runs)" >&2; exit 2; }
	$(MAKE) --no-print-directory -j2 --output-sync=target demo-connectors-train
	$(PY) run_train.py eval --run $(DEMO_OUT)/run --labels $(DEMO_OUT)/corpus/labels.json \
	    --table --compare $(DEMO_OUT)/run-cinego $(addprefix $(DEMO_OUT)/run-,$(CONNECTORS))

demo-connectors-train: $(addprefix demo-run-,$(CONNECTORS))

.PHONY: $(addprefix demo-run-,$(CONNECTORS))
$(addprefix demo-run-,$(CONNECTORS)): demo-run-%:
	$(PY) run_train.py train $(DEMO_DATA) --out $(DEMO_OUT)/run-$* $(CONNECTOR_MODEL) --summary $* \
	    $(CONNECTOR_FLAGS_$*) $(DEMO_TRAIN)

# Issue 16: conversations about two videos, after `make demo`: its manifest grown with the corpus's
# pairs.json (a two-video question for every other video, "Do the two objects move the same way?",
# half "yes") into manifest-pairs/, the full model trained on it with the demo's budget (run-pairs/),
# a two-video chat about held-out videos, and the table beside the demo's run. A target of its own:
# with the pairs in its 3000 steps the full run lost the sign of direction (100% -> 47-49% in two
# runs, README), and the demo has no room for a third training in its 15 minutes.
demo-pairs: setup
	@test -d $(DEMO_OUT)/store.zarr -a -d $(DEMO_OUT)/run || \
	    { echo "demo-pairs: run 'make demo DEMO_OUT=$(DEMO_OUT)' first (its store and run)" >&2; exit 2; }
	rm -rf $(DEMO_OUT)/manifest-pairs && cp -r $(DEMO_OUT)/manifest $(DEMO_OUT)/manifest-pairs
	$(PY) run_extract.py manifest --instructions $(DEMO_OUT)/corpus/pairs.json \
	    --videos $(DEMO_OUT)/corpus/videos --out $(DEMO_OUT)/manifest-pairs
	$(PY) run_train.py train --manifest $(DEMO_OUT)/manifest-pairs --store $(DEMO_OUT)/store.zarr \
	    --out $(DEMO_OUT)/run-pairs $(DEMO_MODEL) --summary-layers 2 --summary-heads 4 --combine concat $(DEMO_TRAIN)
	$(PY) run_train.py chat --run $(DEMO_OUT)/run-pairs \
	    $$(ls $(DEMO_OUT)/heldout/videos/*.mp4 | head -2 | sed 's/^/--video /') --question "Do the two objects move the same way?"
	$(PY) run_train.py eval --run $(DEMO_OUT)/run-pairs --labels $(DEMO_OUT)/corpus/labels.json \
	    --table --compare $(DEMO_OUT)/run

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)
