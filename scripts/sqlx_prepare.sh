#!/usr/bin/env bash
# Writes (or, with --check, verifies) the query data in .sqlx/ that the
# compile-time-checked queries (`sqlx::query!`) are built against: every
# migration is applied to a scratch database on DATABASE_URL's server, and
# `cargo sqlx prepare` describes each query against it. The scratch database
# is dropped afterwards; the database of DATABASE_URL itself is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/pretext}"
server="${url%/*}"
scratch="$server/pretext_sqlx_$$"
cleanup() { sqlx database drop -y --database-url "$scratch" >/dev/null 2>&1 || true; }
trap cleanup EXIT
sqlx database create --database-url "$scratch"
sqlx migrate run --source migrations --database-url "$scratch" >/dev/null
if ! SQLX_OFFLINE=false DATABASE_URL="$scratch" cargo sqlx prepare "$@" -- --locked --all-targets; then
    if [ "${1:-}" = "--check" ]; then
        echo "the query data in .sqlx/ is out of date: run \`make sqlx-prepare\` and commit .sqlx/" >&2
    fi
    exit 1
fi
