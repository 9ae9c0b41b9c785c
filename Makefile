# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel

# Editable: setup.cfg's `package_dir = =.` makes it put the checkout on
# sys.path, so twistd finds twisted/plugins/eventstreams_plugin.py from any
# directory (tests/test_install.py checks this and plain `pip install .`).
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test,kafka]'
	touch $@

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

# playwright-core only: the browser tests drive Debian's /usr/bin/chromium.
tests/browser/node_modules/.package-lock.json: tests/browser/package.json tests/browser/package-lock.json
	npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error

# Old and new Socket.IO clients for the RCStream tests, in .cache/ (not committed).
.cache/rcstream-clients.stamp: $(VENV)/.installed-test tests/rcstream_clients.py tests/rcstream-clients/package.json tests/rcstream-clients/package-lock.json tests/rcstream-clients/client.js
	$(BIN)/python -m tests.rcstream_clients
	mkdir -p .cache && touch $@

# make run ARGS='--set eventstreams.listen=tcp:8093 --set demo.rate=5'
ARGS ?=
run: $(VENV)/.installed
	$(BIN)/twistd --nodaemon --pidfile= eventstreams -c etc/streams.ini $(ARGS)

# ruff and mypy (configured in pyproject.toml), at zero findings. Ends with
# "lint: passed" or "lint: failed", which .ci/run counts as one test.
lint: $(VENV)/.installed-test
	@status=0; \
	$(BIN)/ruff check --quiet || status=1; \
	$(BIN)/mypy || status=1; \
	if [ $$status -eq 0 ]; then echo "lint: passed"; else echo "lint: failed"; fi; \
	exit $$status

# Lint first, then the suite; the suite runs even when lint fails (so one run
# reports both) and `make test` fails if either did.
# Starts a throw-away Apache Kafka broker (scripts/kafka) for tests/test_kafka.py
# and stops it afterwards. Under CI=true a broker that does not start fails the run.
# Two datacenters (tests/test_twodc.py): that broker is cluster A; a second
# one-node cluster B and MirrorMaker 2 copying A's `dc.*` topics to B are
# started beside it (EVENTSTREAMS_KAFKA_B) and stopped with it.
test: $(VENV)/.installed-test tests/js/node_modules/.package-lock.json tests/browser/node_modules/.package-lock.json .cache/rcstream-clients.stamp
	@lint=0; $(MAKE) --no-print-directory lint VENV=$(VENV) || lint=1; \
	export KAFKA_STATE=$${KAFKA_STATE:-/tmp/eventstreams-kafka-$$$$}; \
	if bootstrap=$$(scripts/kafka start); then \
	    export EVENTSTREAMS_KAFKA=$${bootstrap#bootstrap.servers=}; \
	elif [ "$${CI:-}" = true ]; then \
	    echo "make test: the Kafka broker did not start" >&2; exit 1; \
	else \
	    echo "make test: no Kafka broker; the Kafka tests are skipped" >&2; \
	fi; \
	if [ -n "$${EVENTSTREAMS_KAFKA:-}" ] && \
	   bootstrap_b=$$(KAFKA_STATE=$$KAFKA_STATE-b scripts/kafka start) && \
	   KAFKA_MIRROR_TOPICS='dc\..*' scripts/kafka start-mirror "$$EVENTSTREAMS_KAFKA" "$$bootstrap_b" "$$KAFKA_STATE-mirror"; then \
	    export EVENTSTREAMS_KAFKA_B=$${bootstrap_b#bootstrap.servers=}; \
	elif [ "$${CI:-}" = true ]; then \
	    echo "make test: the second Kafka cluster or MirrorMaker did not start" >&2; \
	    scripts/kafka stop-mirror "$$KAFKA_STATE-mirror" || true; \
	    KAFKA_STATE=$$KAFKA_STATE-b scripts/kafka stop || true; scripts/kafka stop || true; exit 1; \
	else \
	    echo "make test: no second cluster; the two-datacenter tests are skipped" >&2; \
	fi; \
	status=0; $(BIN)/trial $(TRIAL_ARGS) tests || status=$$?; \
	scripts/kafka stop-mirror "$$KAFKA_STATE-mirror" || true; \
	KAFKA_STATE=$$KAFKA_STATE-b scripts/kafka stop || true; \
	scripts/kafka stop || true; \
	[ $$status -ne 0 ] || status=$$lint; \
	exit $$status

clean:
	rm -rf $(VENV) _trial_temp* var .mypy_cache .ruff_cache tests/js/node_modules tests/browser/node_modules .cache/rcstream-py .cache/rcstream-js .cache/rcstream-clients.stamp
