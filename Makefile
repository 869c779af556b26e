# edgevl: set-up, demo and tests on a fresh machine.
#   make setup   virtual environment in .venv with the runtime, the export extra and test tools
#   make demo    build a tiny random Qwen2-VL, export it, run it on a real photograph
#   make test    the whole test suite (CPU, ~6 minutes on 2 cores; TEST_JOBS=1 for one process)
#   make bench   edgevl vs transformers on this CPU -> benchmarks/results/cpu-<machine>.{json,md,png}
#                (PRESET=qwen2.5-vl-3b-l4 make bench: the Qwen2.5-VL-3B-shaped model -> cpu-<preset>-<machine>.*)
#   make bench-peers    set up llama.cpp (built from source) and OpenVINO GenAI, each in its own environment
#                       under ~/.cache/edgevl/peers/ (once; never in .venv)
#   make bench-compare  edgevl vs transformers, llama.cpp and OpenVINO on this CPU, one run
#                       -> benchmarks/results/compare-cpu-<machine>.{json,md,png}

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ART    := artifacts
PYTRITON := .cache/pytriton

.PHONY: setup demo test bench bench-peers bench-compare clean

setup: $(VENV)/.installed $(PYTRITON)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch (on disk here); an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[export,quantize,bench,serve,video,triton,dev]'
	touch $@

# A real tritonserver for tests/serve/triton/test_server.py's live tests: the nvidia-pytriton wheel bundles one
# (CPU-only here) and pins numpy<2, so it goes beside the venv, not into it. Optional: if it cannot be installed the
# live tests skip and say why.
$(PYTRITON)/.installed: | $(VENV)/.installed
	$(PY) -m pip install --quiet --target $(PYTRITON) nvidia-pytriton==0.7.0 \
		&& touch $@ || echo "nvidia-pytriton not installed: tests/serve/triton/test_server.py's live server tests will skip"

$(ART)/tiny-model/config.json: | setup
	$(PY) -m edgevl.synthetic.random_model $(ART)/tiny-model --preset tiny --seed 0

$(ART)/tiny-export/manifest.json: $(ART)/tiny-model/config.json
	$(VENV)/bin/edgevl export $(ART)/tiny-model -o $(ART)/tiny-export --force

$(ART)/astronaut.png: | setup
	$(PY) -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.astronaut()).save('$@')"

demo: $(ART)/tiny-export/manifest.json $(ART)/astronaut.png
	$(VENV)/bin/edgevl run $(ART)/tiny-export --image $(ART)/astronaut.png \
		--prompt "Describe this image." --max-new-tokens 32
	@echo "(random weights: the text above is meaningless; a real checkpoint gives real answers)"

# Two workers (pytest-xdist): the suite's exports and parity runs are mostly single-threaded.
TEST_JOBS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_JOBS)

bench: setup
	PY=$(PY) bash benchmarks/run_cpu.sh

bench-peers:
	PYTHON=$(PYTHON) bash benchmarks/setup_peers.sh

bench-compare: setup bench-peers
	PY=$(PY) bash benchmarks/run_compare.sh

clean:
	rm -rf $(ART) .pytest_cache
