# Every target installs what it needs into .venv first (torch pinned and installed first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: install demo test test-slow check lint typecheck bench clean readme zoo

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python examples/demo.py

zoo: install
	$(BIN)/python zoo/build.py

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check mergesmith tests bench examples zoo
	$(BIN)/ruff format --check mergesmith tests bench examples zoo

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

readme: install
	$(BIN)/python -m mergesmith.docs .

bench: install
	$(BIN)/python bench/merge_speed.py

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
