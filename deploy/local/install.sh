#!/usr/bin/env bash
# Installs what a fresh machine lacks to run Vigil's local stack and tests:
#   - Mosquitto, PostgreSQL 15 and Prometheus (its promtool checks deploy/prometheus/) from
#     Debian's packages (when missing; needs root),
#   - a Python virtualenv in .venv with the project and its dev dependencies,
#   - the Kafka broker jars from Maven Central (cached under ~/.cache/vigil).
# Idempotent: a second run on a ready machine only checks.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
# The dashboard's browser test drives Debian's Chromium (Playwright downloads no browser here).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# promtool checks and unit-tests the alerting rules; the e2e test runs a Prometheus of its own.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install.sh: missing ${need_apt[*]}; install them with apt-get (needs root)" >&2
        exit 1
    fi
    echo "install.sh: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian packages start a system-wide broker on 1883 and a Prometheus on 9090 where an
# init system exists; Vigil runs its own on their own ports and does not need those.

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.vigil-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi

.venv/bin/python -m vigil_tools.stack fetch
