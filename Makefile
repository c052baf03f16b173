# make train [ARGS="hydra overrides"]   make test [PYTEST_ARGS="-k ..."]
PY := .venv/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test model-info clean

setup:
	@bash tools/setup_env.sh

train: setup
	$(PY) tools/train.py $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

model-info: setup
	$(PY) tools/model_info.py $(ARGS)

clean:
	rm -rf .venv .pytest_cache
