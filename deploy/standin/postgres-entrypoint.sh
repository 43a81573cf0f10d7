#!/bin/bash
# What the official postgres image's entrypoint does, as far as this project uses it: on an empty
# data directory, initdb with the superuser's password (POSTGRES_PASSWORD, required unless
# POSTGRES_HOST_AUTH_METHOD=trust), clients from other hosts authenticated by it (scram-sha-256),
# then the scripts in /docker-entrypoint-initdb.d (*.sql, *.sh) run against a server that listens
# on its socket only, so that no client connects before they are done; then the server, on every
# address. Runs as root only to hand the data directory to postgres.
set -euo pipefail

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
        echo "error: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
    initdb --username=postgres --pwfile="$pwfile" --auth-local=trust --auth-host="$auth" >/dev/null
    rm -f "$pwfile"
    printf 'host all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sql) echo "running $script"; psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres -f "$script" ;;
            *.sh) echo "running $script"; . "$script" ;;
            *) [ -e "$script" ] && echo "ignoring $script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "database initialized; starting the server"
fi

if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
