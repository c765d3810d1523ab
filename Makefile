# The two commands a fresh machine needs: `make demo` and `make test`. Both install what
# they use: a virtual environment with the Python packages, and Mosquitto through apt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-hfl
# ansible-core 2.20+ needs Python >= 3.12: 2.19 runs on 3.10 and 3.11.
ANSIBLE_VENV  ?= .venv-ansible
ANSIBLE_STAMP := $(ANSIBLE_VENV)/.installed-ansible
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test faults lint bench install mosquitto node npm ansible deploy-tools chromium clean

install: $(STAMP)

# torch is pinned here (a CPU build); pyproject.toml declares a range it satisfies. The
# example tasks (examples/tasks) install as a user's task packages would.
EXAMPLE_TASKS := $(wildcard examples/tasks/*/pyproject.toml)

$(STAMP): pyproject.toml $(EXAMPLE_TASKS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[dev]' $(addprefix -e ,$(dir $(EXAMPLE_TASKS)))
	touch $(STAMP)

# $(call need,CHECK,PACKAGES,WHAT): when the shell test CHECK fails, install the Debian
# PACKAGES with apt (or say what to install where there is no apt).
define need
	@if $(1); then :; \
	elif command -v apt-get >/dev/null; then \
		echo "$(3) is missing: installing $(2) with apt-get"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(2); \
	else \
		echo "$(3) is missing: install $(2) with your package manager, then rerun."; exit 1; \
	fi
endef

mosquitto:
	$(call need,command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ],mosquitto,Mosquitto (the MQTT broker))

# The contract tests check docs/asyncapi.yaml with the official AsyncAPI schema and parser
# (docs/package.json) and run the Node.js example (examples/node). No package needs its
# install scripts (one of the parser's would only send install analytics).
NPM_DIRS := docs examples/node

node:
	$(call need,command -v npm >/dev/null,nodejs npm,Node.js)

%/node_modules/.package-lock.json: %/package-lock.json | node
	npm ci --prefix $* --ignore-scripts --no-audit --no-fund
	touch $@

npm: $(addsuffix /node_modules/.package-lock.json,$(NPM_DIRS))

# The rollout tests' tools: Ansible in a venv of its own, sshd for the test hosts and
# systemd-analyze to verify the units (Debian packages).
ansible: $(ANSIBLE_STAMP)

$(ANSIBLE_STAMP):
	$(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/pip install --quiet 'ansible-core>=2.19,<2.20' 'ansible-lint>=26.10,<27'
	touch $(ANSIBLE_STAMP)

deploy-tools:
	$(call need,[ -x /usr/sbin/sshd ],openssh-server,sshd)
	$(call need,command -v systemd-analyze >/dev/null,systemd,systemd-analyze)

# The dashboard test drives Debian's Chromium with playwright-core (tests/browser): the
# browser comes from apt, never from playwright's own download.
NPM_DIRS += tests/browser
npm: tests/browser/node_modules/.package-lock.json

chromium:
	$(call need,command -v chromium >/dev/null,chromium,Chromium (the dashboard test's browser))

test: chromium

demo: install mosquitto
	$(BIN)/hfl demo --out hfl-demo --report hfl-demo/report.json

test: install mosquitto npm ansible deploy-tools
	$(BIN)/pytest -q

# Fault injection with real processes: kills, broker restart, dropouts, a proxy, 12,000
# fuzzed messages, a full disk, 1000 agents, throttled links (docs/reliability.md). The disk
# and slow-link cases mount a tmpfs and make network namespaces: they need root (else skipped).
faults: install mosquitto
	$(BIN)/pytest -q -m faults -rs tests/faults

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install mosquitto
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) hfl-demo .pytest_cache .ruff_cache .hypothesis $(addsuffix /node_modules,$(NPM_DIRS))
