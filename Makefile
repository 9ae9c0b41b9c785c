# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel

# Editable (compat mode puts the checkout on sys.path, so twistd finds
# twisted/plugins/eventstreams_plugin.py from any directory).
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]' --config-settings editable_mode=compat
	touch $@

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

run: $(VENV)/.installed
	$(BIN)/twistd --nodaemon --pidfile= eventstreams -c etc/streams.ini

test: $(VENV)/.installed-test tests/js/node_modules/.package-lock.json
	$(BIN)/trial $(TRIAL_ARGS) tests

clean:
	rm -rf $(VENV) _trial_temp* var tests/js/node_modules
