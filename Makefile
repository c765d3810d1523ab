# The two commands a fresh machine needs: `make demo` and `make test`. Both install what
# they use: a virtual environment with the Python packages, and Mosquitto through apt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-hfl
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test faults lint bench install mosquitto clean

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

demo: install mosquitto
	$(BIN)/hfl demo --out hfl-demo --report hfl-demo/report.json

test: install mosquitto
	$(BIN)/pytest -q

# Fault injection with real processes: kills, broker restart, dropouts, a proxy, 12,000
# fuzzed messages, a full disk, 1000 agents, throttled links (docs/reliability.md). The disk
# and slow-link cases mount a tmpfs and make network namespaces: they need root (else skipped).
faults: install mosquitto
	$(BIN)/pytest -q -m faults -rs tests/faults

lint: install
	$(BIN)/ruff check .

bench: install mosquitto
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) hfl-demo .pytest_cache .ruff_cache .hypothesis
