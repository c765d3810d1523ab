# The two commands a fresh machine needs: `make demo` and `make test`. Both install what
# they use: a virtual environment with the Python packages, and Mosquitto through apt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-hfl
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test lint bench install mosquitto node npm clean

install: $(STAMP)

# torch is pinned here (a CPU build); pyproject.toml declares a range it satisfies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

mosquitto:
	@if command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "Mosquitto is missing: installing it with apt-get"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends mosquitto; \
	else \
		echo "Mosquitto (the MQTT broker) is missing: install it with your package manager,"; \
		echo "e.g. 'brew install mosquitto' or 'dnf install mosquitto', then rerun."; exit 1; \
	fi

# The contract tests check docs/asyncapi.yaml with the official AsyncAPI schema and parser
# (docs/package.json) and run the Node.js example (examples/node). No package needs its
# install scripts (one of the parser's would only send install analytics).
NPM_DIRS := docs examples/node

node:
	@if command -v npm >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "Node.js is missing: installing it with apt-get"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends nodejs npm; \
	else \
		echo "Node.js and npm are missing: install them with your package manager, then rerun."; \
		exit 1; \
	fi

%/node_modules/.package-lock.json: %/package-lock.json | node
	npm ci --prefix $* --ignore-scripts --no-audit --no-fund
	touch $@

npm: $(addsuffix /node_modules/.package-lock.json,$(NPM_DIRS))

demo: install mosquitto
	$(BIN)/hfl demo --out hfl-demo --report hfl-demo/report.json

test: install mosquitto npm
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install mosquitto
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) hfl-demo .pytest_cache .ruff_cache .hypothesis $(addsuffix /node_modules,$(NPM_DIRS))
