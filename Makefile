# Two entry points; each creates .venv on a fresh machine (scripts/setup_venv.sh).
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: venv test demo study lint bench clean

venv:
	bash scripts/setup_venv.sh

test: venv
	$(PY) -m ruff check spre_fx integrations tests examples benchmarks
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15 -ra

demo: venv
	$(PY) examples/digits.py

# The accuracy study of docs/results.md (~20 min standalone on 2 cores; longer on a shared machine).
study: venv
	$(PY) examples/study.py --jobs 3 --out out/study

lint: venv
	$(PY) -m ruff check spre_fx integrations tests examples benchmarks

bench: venv
	$(PY) benchmarks/prepare_convert.py
	$(PY) benchmarks/latency.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis
