#!/usr/bin/env bash
# One command for each job on a fresh machine; each does its own set-up.
#   ./dev.sh demo    install keyagent into .venv and run the demo (embedded simulator)
#   ./dev.sh test    install what the tests need (apt + .venv), run the checks, then the tests
#   ./dev.sh check   only the checks: ruff, ruff format, mypy, import-linter (needs .venv, .venv-lint)
#   ./dev.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")"

# What keyagent runs with (the Containerfile installs the same), then what
# only the tests need: a libvirtd for the --libvirt backend, the
# toolchain libvirt-python builds with, chromium (headless) to load the
# pages `keyagent replay --html` writes, and podman + debootstrap to build and
# run contrib/container/Containerfile (tests/contrib/test_container_image.py),
# and PostgreSQL (initdb, pg_ctl; its libpq5 is what psycopg loads) for the
# guest owner's database tests (tests/owner/conftest.py: a throwaway cluster).
APT_PACKAGES=(qemu-system-x86 qemu-utils swtpm swtpm-tools keyutils ovmf)
TEST_APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc chromium
                   podman debootstrap postgresql)
VENV=${KEYAGENT_VENV:-.venv}
# import-linter lives in its own venv: it brings rich, which structlog imports
# whenever it can (40 ms and 4 MB more in every sidecar the tests and the
# bench start), so .venv holds only what a deployment and the tests need.
LINT_VENV=${KEYAGENT_LINT_VENV:-$VENV-lint}
PYTHON=${PYTHON:-python3}

apt_setup() {
    local missing=()
    for p in "${APT_PACKAGES[@]}" "${TEST_APT_PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "dev.sh: missing Debian packages (${missing[*]}); run as root or install them" >&2
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

venv_setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
}

lint_setup() {
    [ -x "$LINT_VENV/bin/python" ] || "$PYTHON" -m venv "$LINT_VENV"
    "$LINT_VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[lint]"
}

# libvirt-python builds from source against libvirt-dev: only where it can.
libvirt_setup() {
    pkg-config --exists libvirt 2>/dev/null || return 0
    "$VENV/bin/python" -c 'import libvirt' 2>/dev/null && return 0
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[libvirt]"
}

# The static checks, configured in pyproject.toml: lint, formatting, types
# (strict on the packages [tool.mypy] names), the layering ([tool.importlinter]).
# Each runs even when one before it failed; any failure fails the run.
checks() {
    local failed=()
    "$VENV/bin/ruff" check . || failed+=("ruff check")
    "$VENV/bin/ruff" format --check . || failed+=("ruff format --check")
    "$VENV/bin/mypy" agent || failed+=(mypy)
    "$LINT_VENV/bin/lint-imports" || failed+=(lint-imports)
    if [ ${#failed[@]} -ne 0 ]; then
        local IFS=,
        echo "dev.sh: checks failed: ${failed[*]}" >&2
        return 1
    fi
}

case "${1:-}" in
    setup) apt_setup; venv_setup; lint_setup; libvirt_setup ;;
    demo)  venv_setup; exec "$VENV/bin/keyagent" demo ;;
    test)
        shift
        apt_setup; venv_setup; lint_setup; libvirt_setup
        checks
        set +e
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
        rc=$?
        [ $rc -eq 5 ] && { echo "dev.sh: pytest collected no tests" >&2; exit 1; }
        exit $rc ;;
    check) [ -x "$VENV/bin/mypy" ] || venv_setup; [ -x "$LINT_VENV/bin/lint-imports" ] || lint_setup; checks ;;
    *) echo "usage: ./dev.sh demo | test [PYTEST-ARGS] | check | setup" >&2; exit 2 ;;
esac
