# q4lab. Each target first runs scripts/setup.sh, which builds .venv (a no-op when it is up to date).
#   make report   run every notebook through papermill into reports/index.html
#   make test     also apt-get install what the tests use (hipcc, clang-19, chromium), then run the whole test suite
#   make lab      JupyterLab on notebooks/, with .venv as the kernel
# Variables: PYTHON (the interpreter .venv is made from; its torch is reused), PORT (make lab),
#            PYTEST_ARGS (e.g. make test PYTEST_ARGS="-m 'not browser' -x").
PYTHON ?= python3
PORT ?= 8888
PYTEST_ARGS ?=
# exported so that scripts/setup.sh, and tests that run it again, set up from the same interpreter
export PYTHON

.PHONY: setup report test lab

setup:
	scripts/setup.sh

report: setup
	.venv/bin/q4lab report

test:
	scripts/setup.sh --system
	@# pytest exits 5 when it collected nothing: that is a failure too, and make fails on any non-zero status.
	.venv/bin/python -m pytest $(PYTEST_ARGS) || { status=$$?; \
		if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$status; }

lab: setup
	PORT="$(PORT)" scripts/lab.sh
