# The two commands a new user needs: `make demo` and `make test`. Both build the
# virtual environment themselves on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

GUEST_ASSETS := .cache/guest
# The in-guest balloon agent, one file to copy into a guest (docs/agent.md).
AGENT_PYZ ?= build/balloonist-agent.pyz

.PHONY: demo demo-vm test lint typecheck unit bench bench-vm experiments clean test-deps guest-assets \
	agent-pyz libvirt-deps

# Debian's python3 makes virtual environments only with python3-venv: as root, install
# it; otherwise say so in one line.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else echo "make: $(PYTHON) cannot make a virtual environment: install python3-venv (as root: apt-get install python3-venv)" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/balloonist demo

# Three real QEMU guests under the daemon (needs root for the set-up, like the vm tests).
demo-vm: $(STAMP) guest-assets
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/balloonist demo-vm

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) guest-assets libvirt-deps
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/pytest

# The real-VM tests need QEMU, a Debian kernel (apt package lists for `apt-get
# download`) and gcc with a static libc (the guest's workload is linked -static); the
# dashboard tests need Chromium. As root, install what is missing; otherwise say what
# to install. Under CI a failure here fails the run; elsewhere those tests then skip.
TEST_DEBS := qemu-system-x86_64:qemu-system-x86 chromium:chromium gcc:gcc
STATIC_LIBC := /usr/lib/x86_64-linux-gnu/libc.a
test-deps:
	@missing=$$(for dep in $(TEST_DEBS); do command -v $${dep%%:*} >/dev/null || printf ' %s' $${dep#*:}; done; \
	  [ -e $(STATIC_LIBC) ] || printf ' %s' libc6-dev); \
	if [ -z "$$missing" ] && [ -n "$$(ls /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && { [ -z "$$missing" ] || \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
	else echo "make: the real-VM and dashboard tests need$${missing:+$$missing and} apt package lists (run as root)" >&2; \
	  [ -z "$$CI" ]; fi

# The libvirt tests run a libvirtd of their own (tests/libvirt/conftest.py): as root,
# install libvirt's daemon, its QEMU driver, virsh and the headers pip builds
# libvirt-python against, then the balloonist[libvirt] extra. Without root, say what
# is missing; those tests then skip (under CI they fail).
LIBVIRT_DEBS := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
LIBVIRT_STAMP := $(VENV)/.libvirt-stamp
LIBVIRT_QEMU_DRIVER := /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so
libvirt-deps: $(LIBVIRT_STAMP)
$(LIBVIRT_STAMP): $(STAMP) test-deps
	@set -e; if { command -v libvirtd && command -v virsh && pkg-config --exists libvirt \
	    && [ -e $(LIBVIRT_QEMU_DRIVER) ]; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(LIBVIRT_DEBS) >/dev/null; \
	else echo "make: the libvirt tests need$(foreach d,$(LIBVIRT_DEBS), $(d)) (run as root)" >&2; \
	  [ -z "$$CI" ] || exit 1; exit 0; fi; \
	$(BIN)/pip install --quiet -e '.[libvirt]' && touch $(LIBVIRT_STAMP)

guest-assets: $(STAMP) test-deps
	$(BIN)/balloonist guest-assets --cache $(GUEST_ASSETS) || [ -z "$$CI" ]

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sim.py
	$(BIN)/python benchmarks/bench_policy.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_api.py

bench-vm: $(STAMP) guest-assets
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_vm_reclaim.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_vm_fidelity.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_daemon_overhead.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_agent_inflate.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_vm_demand.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_vm_policies.py
	BALLOONIST_GUEST_ASSETS=$(GUEST_ASSETS) $(BIN)/python benchmarks/bench_vm_rescue.py

experiments: $(STAMP)
	$(BIN)/python -m balloonist.experiments docs/experiments

agent-pyz: $(STAMP)
	mkdir -p $(dir $(AGENT_PYZ))
	$(BIN)/balloonist agent-pyz --output $(AGENT_PYZ)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache balloonist-demo $(GUEST_ASSETS) \
	  $(AGENT_PYZ)
