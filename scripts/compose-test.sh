#!/usr/bin/env bash
# The end-to-end suite against the Docker Compose stack, in containers: docker-compose.yml as
# users run it, with docker-compose.standin.yml's stand-ins for the images only a registry has.
#
#   scripts/compose-test.sh [test filters…]   # what scripts/test.sh runs after the rest
#
# Starts a Docker engine when none answers (and stops it at the end), makes the Debian base image
# with debootstrap once, builds the stand-in images and the processes' images (deploy/Dockerfile,
# with the binaries of this machine's `cargo build`), tears down a stack left from an earlier run,
# brings the stack up and waits for every healthcheck (at most $COMPOSE_HEALTH_TIMEOUT seconds,
# else it names the container that is not healthy, with its last health output and log lines),
# runs the end-to-end suite with E2E_STACK=compose, keeps every container's log in
# target/compose-logs/, and tears everything down, volumes included. Nothing it starts outlives
# it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PROJECT=order-saga-e2e
ARTIFACTS=target/compose-logs
HEALTH_TIMEOUT=${COMPOSE_HEALTH_TIMEOUT:-240}
# Every service but Grafana and Jaeger, which have no stand-in (no Debian package).
SERVICES=(kafka topics postgres order-service inventory-service payment-service payment-gateway
    outbox-relay saga-monitor prometheus)
export POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-saga-local-dev}
export ADMIN_TOKEN=${ADMIN_TOKEN:-saga-local-dev-admin}
# docker-compose 1.x builds through the docker CLI (BuildKit: deploy/Dockerfile's unused build
# stage is skipped), and finds Debian's CLI first.
export COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1 PATH="/usr/bin:$PATH"

compose() {
    as_root env POSTGRES_PASSWORD="$POSTGRES_PASSWORD" ADMIN_TOKEN="$ADMIN_TOKEN" \
        COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1 PATH="$PATH" \
        docker-compose -p "$PROJECT" -f docker-compose.yml -f docker-compose.standin.yml "$@"
}

# Every container's log into $ARTIFACTS, then the stack and its volumes down.
tear_down() {
    mkdir -p "$ARTIFACTS"
    local id name
    for id in $(compose ps -q 2>/dev/null); do
        name=$(as_root "$DOCKER" inspect -f '{{.Name}}' "$id" | sed 's|^/||')
        as_root "$DOCKER" logs --timestamps "$id" >"$ARTIFACTS/$name.log" 2>&1 || true
    done
    compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
}

finish() {
    local status=$?
    say "keeping every container's log in $ARTIFACTS/ and tearing the stack down"
    tear_down
    stop_docker_engine
    exit "$status"
}

# The images of the stand-ins, and the one that holds this machine's binaries for
# deploy/Dockerfile's BINARIES.
build_images() {
    local context
    context=$(mktemp -d)
    cp deploy/standin/kafka.Dockerfile "$context/Dockerfile"
    cp "$TANSU_BIN" "$context/tansu"
    say "building the stand-in images (Tansu, Postgres and Prometheus from Debian's packages)"
    as_root "$DOCKER" build -q -t order-saga/standin-kafka:local "$context" >/dev/null
    rm -rf "$context"
    as_root "$DOCKER" build -q -f deploy/standin/postgres.Dockerfile -t order-saga/standin-postgres:local deploy/standin >/dev/null
    as_root "$DOCKER" build -q -f deploy/standin/prometheus.Dockerfile -t order-saga/standin-prometheus:local deploy/standin >/dev/null
    say "building the processes' binaries (cargo build) for their images"
    cargo build --workspace --bins
    context=$(mktemp -d)
    local bin
    for bin in order-service inventory-service payment-service payment-gateway outbox-relay saga-monitor; do
        objcopy --strip-debug "target/debug/$bin" "$context/$bin"
    done
    printf 'FROM scratch\nCOPY . /out/\n' >"$context/Dockerfile"
    as_root "$DOCKER" build -q -t order-saga/binaries:local "$context" >/dev/null
    rm -rf "$context"
    say "building the processes' images from deploy/Dockerfile"
    mkdir -p "$ARTIFACTS"
    compose build >"$ARTIFACTS/build.log" 2>&1 || {
        tail -n 30 "$ARTIFACTS/build.log" >&2
        die "building the images failed (the whole output: $ARTIFACTS/build.log)"
    }
}

# Polls until every service is healthy (the topics job: exited 0), at most HEALTH_TIMEOUT
# seconds; else names what is not, with its last health output and log lines, and fails.
wait_healthy() {
    local deadline=$((SECONDS + HEALTH_TIMEOUT)) waiting id line name state health code
    while :; do
        waiting=()
        for id in $(compose ps -q); do
            line=$(as_root "$DOCKER" inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}' "$id")
            read -r name state health code <<<"$line"
            name=${name#/}
            case "$name:$state:$health:$code" in
                *topics*:exited:-:0 | *:running:healthy:*) ;;
                *topics*:exited:*) die "the topics job failed (exit $code): $(as_root "$DOCKER" logs --tail 20 "$id" 2>&1)" ;;
                *) waiting+=("$name ($state${health:+, $health})") ;;
            esac
        done
        [ "$(compose ps -q | wc -l)" -ge "${#SERVICES[@]}" ] && [ "${#waiting[@]}" -eq 0 ] && return
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "not healthy after ${HEALTH_TIMEOUT} s: ${waiting[*]}"
            for id in $(compose ps -q); do
                name=$(as_root "$DOCKER" inspect -f '{{.Name}}' "$id" | sed 's|^/||')
                printf '%s\n' "${waiting[@]}" | grep -q "^$name " || continue
                echo "--- $name: last healthcheck output" >&2
                as_root "$DOCKER" inspect -f '{{range .State.Health.Log}}{{.Output}}{{end}}' "$id" 2>/dev/null | tail -n 5 >&2 || true
                echo "--- $name: last log lines" >&2
                as_root "$DOCKER" logs --tail 20 "$id" >&2 2>&1 || true
            done
            die "the Compose stack did not come up"
        fi
        sleep 2
    done
}

ensure_tansu
ensure_docker_engine
trap finish EXIT
ensure_base_image
say "tearing down what an earlier run left (project $PROJECT)"
compose down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
rm -rf "$ARTIFACTS"
build_images
started=$SECONDS
say "starting the Compose stack: ${SERVICES[*]} (Grafana and Jaeger have no stand-in)"
if ! compose up -d "${SERVICES[@]}" >"$ARTIFACTS/up.log" 2>&1; then
    tail -n 20 "$ARTIFACTS/up.log" >&2
    # docker-compose gives up on the first dependency that failed: show why it did.
    for id in $(compose ps -q); do
        line=$(as_root "$DOCKER" inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}}' "$id")
        read -r name state code <<<"$line"
        if [ "$state" != running ] && [ "$code" != 0 ]; then
            echo "--- ${name#/} ($state, exit $code): last log lines" >&2
            as_root "$DOCKER" logs --tail 20 "$id" >&2 2>&1 || true
        fi
    done
    die "docker-compose up failed (its output: $ARTIFACTS/up.log)"
fi
wait_healthy
say "every container healthy after $((SECONDS - started)) s"

# The end-to-end suite against the containers: the broker at the address it advertises, Postgres
# with its password, the admin token, and the stack's project for the tests that cut, pause and
# kill containers.
export E2E_STACK=compose \
    E2E_KAFKA_BOOTSTRAP=172.29.87.10:9092 \
    E2E_POSTGRES_URL="postgres://postgres:$POSTGRES_PASSWORD@127.0.0.1:5433" \
    E2E_ADMIN_TOKEN="$ADMIN_TOKEN" \
    E2E_COMPOSE_PROJECT="$PROJECT"
# The Docker daemon's restart comes last, alone: the stand-in broker starts empty after it (its
# log is in memory), which the saga monitor's projection cannot take in (the new records' offsets
# are those of steps it already holds) and the tests after it would meet.
RESTART_TEST=docker_daemon_restart
# Only a daemon this command started is restarted by a test.
[ -n "$DOCKERD_PID" ] && export E2E_DOCKERD_LOG="$DOCKERD_LOG"
status=0
if [ "$#" -eq 0 ]; then
    scripts/test.sh -- --skip "$RESTART_TEST" || status=$?
else
    scripts/test.sh "$@" || status=$?
fi
if [ -z "$DOCKERD_PID" ]; then
    say "SKIPPED: the Docker daemon restart test; the engine was not started by this command, so it is not restarted"
elif [ "$#" -eq 0 ]; then
    say "restarting the Docker daemon under the stack (the last test)"
    scripts/test.sh -- "$RESTART_TEST" || status=$?
fi
exit "$status"
