#!/usr/bin/env bash
# Install what the proxy conformance tests (cargo test --test proto) and scripts/bench-proxy need:
# PostgreSQL server and client (initdb, psql, pgbench), pgbouncer, psycopg 3, asyncpg and SQLAlchemy
# (PyPI), node-postgres and postgres.js (npm, pinned by proto-tests/node/package-lock.json), a JDK
# and pgjdbc (Debian). Idempotent; as root it installs, otherwise
# it prints the command to run. The work is done by scripts/prereqs (scripts/test runs it too).
#
#   proto-tests/setup.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
"$HERE/../scripts/prereqs" bench

echo "proto-tests prerequisites: ok"
echo "  PostgreSQL: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
echo "  pgbouncer:  $( (pgbouncer --version 2>/dev/null || /usr/sbin/pgbouncer --version) | head -n1)"
echo "  psycopg:    $(python3 -c 'import psycopg; print(psycopg.__version__)')"
echo "  node-pg:    $(cd "$HERE/node" && node -p 'require("pg/package.json").version')"
echo "  postgres.js: $(cd "$HERE/node" && node -p 'require("./node_modules/postgres/package.json").version')"
echo "  asyncpg:    $(python3 -c 'import asyncpg; print(asyncpg.__version__)')"
echo "  SQLAlchemy: $(python3 -c 'import sqlalchemy; print(sqlalchemy.__version__)')"
echo "  pgjdbc:     $(ls /usr/share/java/postgresql-[0-9]*.jar 2>/dev/null | head -n1)"
