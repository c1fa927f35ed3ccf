# Two commands do all set-up:  `make demo` (the main job) and `make test` (the suite).
# Both create .venv from the pinned locks and install the Debian packages they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
APT_PACKAGES := espeak-ng sox libsndfile1
PYTEST_ARGS ?=

.PHONY: all install apt demo test clean

all: test

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): setup.py requirements/cpu.lock requirements/test.lock
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/test.lock
	$(PIP) install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

install: apt $(STAMP)

demo: install
	$(VENV)/bin/speechverse-jax demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
