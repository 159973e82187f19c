# Two commands do everything on a fresh machine:
#   make demo   set up (venv, torch, build) and run the main job
#   make test   set up and run the tests (pytest + the C++ kernel tests under ctest + make docs)
# Override TORCH_SPEC to pick another torch, e.g. TORCH_SPEC=torch==2.13.0 (CPU build).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# The compiled core's files: the entries of csrc/sources.txt (the list setup.py and CMakeLists.txt
# read) but the C++ tests, globs expanded.
SOURCES := $(wildcard $(shell sed -n -e '/^test[[:space:]]/d' -e 's/^[a-z][a-z]*[[:space:]][[:space:]]*\([^[:space:]]*\).*/\1/p' csrc/sources.txt)) \
	csrc/sources.txt setup.py pyproject.toml

.PHONY: setup build test pytest test-quick ctest docs demo bench peers-env bench-peers clean

setup: $(VENV)/.deps
build: $(VENV)/.built

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

# pip -v shows what setup.py prints while it builds (what, for which GPUs, how long, a line per
# compiled file); quiet=true keeps setuptools' own log out of it.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/python -m pip install -v --config-settings quiet=true --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import amaml_ext, json; print(json.dumps(amaml_ext.build_info()))"
	touch $@

test: pytest ctest docs

pytest: build
	$(BIN)/python -m pytest python_tests -q

# The fast subset: every layer's tests but those marked slow (processes started, training runs,
# torch.compile, convergence studies): under 2 minutes on 2 CPU cores. `make test` runs them all.
test-quick: build
	$(BIN)/python -m pytest python_tests -q -m "not slow"

ctest: setup
	cmake -S . -B build-ctest -DPython_EXECUTABLE=$(abspath $(BIN)/python) -DCMAKE_BUILD_TYPE=Release
	cmake --build build-ctest -j $(MAX_JOBS)
	ctest --test-dir build-ctest --output-on-failure

# The API reference (docs/sphinx: autodoc + napoleon from the docstrings, the notes docs/*.md
# included) into docs/_build/html, every warning an error; then every docstring example (>>>) of
# the package runs as a doctest, warnings errors too. About 30 s on 2 CPU cores.
DOCS_OUT ?= docs/_build
docs: build
	$(BIN)/sphinx-build -W --keep-going -q -b html docs/sphinx $(DOCS_OUT)/html
	$(BIN)/python -m pytest -q --doctest-modules amaml_ext -W error \
		-o doctest_optionflags="ELLIPSIS NORMALIZE_WHITESPACE"

# The main job: A-MAML and the five baselines meta-trained on the same CosMixture tasks, then
# meta-tested on 100 new tasks: plot + table in runs/demo (about 5 minutes on one CPU core;
# an interrupted run continues where it stopped when started again).
DEMO_ARGS ?= --task cosmixture --setting 50shot-50val --meta-steps 1000 --inner-steps 50 \
	--maml-steps 10 --compile --out runs/demo
demo: build
	$(BIN)/amaml-ext compare $(DEMO_ARGS)

bench: build
	$(BIN)/python -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

# The peer benchmark (docs/benchmarks.md, Peers): its own venv with higher and TorchOpt on top of
# $(VENV) (a .pth file, no second torch), learn2learn's source package unpacked beside them.
PEERS_VENV ?= .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
LEARN2LEARN ?= learn2learn==0.2.0
PEERS_ARGS ?= --mem-limit 4 --out docs/results/peers_cpu.json
PURELIB := import sysconfig; print(sysconfig.get_paths()['purelib'])

peers-env: $(PEERS_VENV)/.deps

$(PEERS_VENV)/.deps: benchmarks/peers/requirements.txt | $(VENV)/.deps
	$(PYTHON) -m venv $(PEERS_VENV)
	$(BIN)/python -c "$(PURELIB)" > "$$($(PEERS_BIN)/python -c "$(PURELIB)")/_amaml_project_venv.pth"
	$(PEERS_BIN)/python -m pip install -q -r benchmarks/peers/requirements.txt
	rm -rf $(PEERS_VENV)/src
	$(PEERS_BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(PEERS_VENV)/src "$(LEARN2LEARN)"
	cd $(PEERS_VENV)/src && tar xzf learn2learn-*.tar.gz
	touch $@

bench-peers: build peers-env
	OMP_NUM_THREADS=1 $(PEERS_BIN)/python -m benchmarks.peers $(PEERS_ARGS)

clean:
	rm -rf build build-ctest *.egg-info amaml_ext/_C*.so
