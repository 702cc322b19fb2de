#!/usr/bin/env bash
# Install what the proxy conformance tests (cargo test --test proto) and scripts/bench-proxy need
# on a Debian machine, as root. Idempotent: already installed pieces are skipped.
#
#   proto-tests/setup.sh
#
# Installs: PostgreSQL server and client (initdb, psql, pgbench), pgbouncer, python3 + pip with
# psycopg 3 (binary wheel), asyncpg and SQLAlchemy (from PyPI), Node.js + npm with node-postgres
# and postgres.js (pinned by proto-tests/node/package-lock.json, from npm), a JDK and pgjdbc
# (Debian's libpostgresql-jdbc-java).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
pg_bin_has() { ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1; }

pg_bin_has initdb || need_apt+=(postgresql)
pg_bin_has pgbench || need_apt+=(postgresql)
have psql || need_apt+=(postgresql-client)
[ -x /usr/sbin/pgbouncer ] || have pgbouncer || need_apt+=(pgbouncer)
have python3 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
have node || need_apt+=(nodejs)
have javac || need_apt+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
have npm || need_apt+=(npm)

if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The Debian postgresql package starts a cluster on port 5432; the tests start their own.
# pgbouncer's packaged service is not needed either (the bench starts its own instance).
if have systemctl && systemctl is-enabled pgbouncer >/dev/null 2>&1; then
  systemctl disable --now pgbouncer >/dev/null 2>&1 || true
fi

# psycopg 3 with its binary wheel (no libpq build needed)
if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
  python3 -m pip install --quiet 'psycopg[binary]>=3.1' \
    || python3 -m pip install --quiet --break-system-packages 'psycopg[binary]>=3.1'
fi

# asyncpg and SQLAlchemy (its asyncio extension needs greenlet)
if ! python3 -c 'import asyncpg, sqlalchemy, greenlet' >/dev/null 2>&1; then
  python3 -m pip install --quiet 'asyncpg>=0.29' 'sqlalchemy>=2.0' greenlet \
    || python3 -m pip install --quiet --break-system-packages 'asyncpg>=0.29' 'sqlalchemy>=2.0' greenlet
fi

# node-postgres and postgres.js, exactly as locked
if [ ! -d "$HERE/node/node_modules/pg" ] || [ ! -d "$HERE/node/node_modules/postgres" ]; then
  (cd "$HERE/node" && npm ci --no-audit --no-fund --silent)
fi

echo "proto-tests prerequisites: ok"
echo "  PostgreSQL: $(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
echo "  pgbouncer:  $( (pgbouncer --version 2>/dev/null || /usr/sbin/pgbouncer --version) | head -n1)"
echo "  psycopg:    $(python3 -c 'import psycopg; print(psycopg.__version__)')"
echo "  node-pg:    $(cd "$HERE/node" && node -p 'require("pg/package.json").version')"
echo "  postgres.js: $(cd "$HERE/node" && node -p 'require("postgres/package.json").version')"
echo "  asyncpg:    $(python3 -c 'import asyncpg; print(asyncpg.__version__)')"
echo "  SQLAlchemy: $(python3 -c 'import sqlalchemy; print(sqlalchemy.__version__)')"
echo "  pgjdbc:     $(ls /usr/share/java/postgresql-[0-9]*.jar 2>/dev/null | head -n1)"
