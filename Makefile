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

.PHONY: demo test lint bench install mosquitto node npm ansible deploy-tools clean

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

# The rollout tests' tools: Ansible in a venv of its own, sshd for the test hosts and
# systemd-analyze to verify the units (Debian packages).
ansible: $(ANSIBLE_STAMP)

$(ANSIBLE_STAMP):
	$(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/pip install --quiet 'ansible-core>=2.19,<2.20' 'ansible-lint>=26.10,<27'
	touch $(ANSIBLE_STAMP)

deploy-tools:
	@missing=""; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "Installing$$missing with apt-get"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	else \
		echo "Missing:$$missing (sshd, systemd-analyze): install them with your package manager."; \
		exit 1; \
	fi

demo: install mosquitto
	$(BIN)/hfl demo --out hfl-demo --report hfl-demo/report.json

test: install mosquitto npm ansible deploy-tools
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install mosquitto
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) hfl-demo .pytest_cache .ruff_cache .hypothesis $(addsuffix /node_modules,$(NPM_DIRS))
