#!/usr/bin/env bash
# Checks that the Postgres server of DATABASE_URL answers; says how to get one if not.
set -euo pipefail
url="${1:-postgres://postgres@127.0.0.1:5432/pretext}"
hostport="${url#*://}"
hostport="${hostport#*@}"
hostport="${hostport%%/*}"
host="${hostport%%:*}"
port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=5432
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  exit 0
fi
cat >&2 <<MSG
No Postgres answers at $host:$port (DATABASE_URL=$url).
Start one, then run this command again:
  - with Docker:  docker compose -f docker/compose.yaml up -d postgres
  - on Debian:    apt-get install postgresql && pg_ctlcluster 15 main start
  - or point DATABASE_URL at an existing server.
MSG
exit 1
