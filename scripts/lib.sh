# Shared by run.sh and test.sh: install and start what the system needs, printing what it does.
# shellcheck shell=bash

TANSU_VERSION=0.6.0
# The project's patches to Tansu (scripts/tansu/<crate>/*.patch); the number names the cached
# build, so changing the patches means bumping it.
TANSU_PATCHLEVEL=3
CACHE_DIR="${ORDER_SAGA_CACHE:-$HOME/.cache/order-saga}"
TANSU_BIN="${TANSU_BIN:-$CACHE_DIR/tansu-$TANSU_VERSION-p$TANSU_PATCHLEVEL/bin/tansu}"
export TANSU_BIN
PG_HOST=127.0.0.1
PG_PORT=5432

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"; fi
}

# curl, used to wait for readiness and to seed products.
ensure_curl() {
    command -v curl >/dev/null && return
    say "installing curl from Debian's packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq curl >/dev/null
}

# Postgres on 127.0.0.1:5432 with trust auth for user postgres. Installed from Debian's packages
# when no server answers and none is installed.
ensure_postgres() {
    if port_open "$PG_HOST" "$PG_PORT"; then
        say "Postgres answers on $PG_HOST:$PG_PORT"
        return
    fi
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        say "installing Postgres from Debian's packages"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
        local hba
        hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
        # Local development only: trust connections from this machine.
        as_root sed -i -E 's/^(local|host)(\s+all\s+all\s+.*\s)(peer|md5|scram-sha-256)$/\1\2trust/' "$hba"
        as_root sed -i -E 's/^(local\s+all\s+postgres\s+)peer$/\1trust/' "$hba"
    fi
    local version
    version=$(ls /etc/postgresql | sort -n | tail -1)
    say "starting Postgres $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do
        port_open "$PG_HOST" "$PG_PORT" && { say "Postgres is up"; return; }
        sleep 0.5
    done
    die "Postgres did not come up on $PG_HOST:$PG_PORT"
}

# The Tansu broker, built with cargo from crates.io's sources with the project's patches
# (scripts/tansu/<crate>/*.patch; what each fixes is said in the patch) and cached in $CACHE_DIR.
# Cargo's target directory is kept across patch levels, one per Tansu version, and the sources are
# refreshed file by file (a file whose content did not change keeps its time stamp), so a new or
# changed patch rebuilds only the patched crates and those above them.
ensure_tansu() {
    if [ -x "$TANSU_BIN" ]; then
        say "Tansu broker: $TANSU_BIN"
        return
    fi
    local src="$CACHE_DIR/tansu-$TANSU_VERSION-src" target="$CACHE_DIR/tansu-$TANSU_VERSION-target"
    if [ -d "$target/release" ]; then
        say "rebuilding the Tansu broker $TANSU_VERSION with the project's patches, level $TANSU_PATCHLEVEL (the patched crates only: a few minutes)"
    else
        say "building the Tansu broker $TANSU_VERSION with the project's patches (about 8 minutes on 2 cores, once; cached in $CACHE_DIR)"
    fi
    local fresh="$src.new" here dir crate patch started
    here=$(pwd)
    started=$(date +%s)
    rm -rf "$fresh"
    mkdir -p "$fresh" "$src"
    curl -fsSL "https://static.crates.io/crates/tansu/tansu-$TANSU_VERSION.crate" |
        tar -xz -C "$fresh" || die "downloading tansu $TANSU_VERSION from crates.io failed"
    printf '\n[patch.crates-io]\n' >>"$fresh/tansu-$TANSU_VERSION/Cargo.toml"
    for dir in "$here"/scripts/tansu/*/; do
        crate=$(basename "$dir")
        curl -fsSL "https://static.crates.io/crates/$crate/$crate-$TANSU_VERSION.crate" |
            tar -xz -C "$fresh" || die "downloading $crate $TANSU_VERSION from crates.io failed"
        for patch in "$dir"*.patch; do
            (cd "$fresh/$crate-$TANSU_VERSION" && git apply "$patch") || die "applying $patch failed"
        done
        printf '%s = { path = "../%s-%s" }\n' "$crate" "$crate" "$TANSU_VERSION" \
            >>"$fresh/tansu-$TANSU_VERSION/Cargo.toml"
    done
    # Cargo decides what to rebuild by time stamps: a file is replaced only when its content
    # changed (then it is newer than the last build), and files no longer there are removed.
    (cd "$fresh" && find . -type f) | while read -r file; do
        cmp -s "$fresh/$file" "$src/$file" && continue
        mkdir -p "$(dirname "$src/$file")"
        cp "$fresh/$file" "$src/$file"
    done
    (cd "$src" && find . -type f) | while read -r file; do
        [ -e "$fresh/$file" ] || rm -f "$src/$file"
    done
    rm -rf "$fresh"
    # The crate's own Cargo.lock pins every other dependency; only the patched ones change.
    (cd "$src/tansu-$TANSU_VERSION" && set -o pipefail &&
        CARGO_TARGET_DIR="$target" cargo build --release --features dynostore 2>&1 |
        grep --line-buffered -E '^\s*(Compiling tansu|Finished|error|warning: build failed)' >&2) ||
        die "building Tansu failed; run CARGO_TARGET_DIR=$target cargo build --release --features dynostore in $src/tansu-$TANSU_VERSION by hand to see why"
    mkdir -p "$(dirname "$TANSU_BIN")"
    cp "$target/release/tansu" "$TANSU_BIN"
    say "built the Tansu broker in $(($(date +%s) - started)) s: $TANSU_BIN"
}

# kcat for the local broker: Debian's kcat links librdkafka 2.0.2, which cannot parse Tansu's
# ApiVersions reply, so it runs with the newer librdkafka that the rdkafka crate vendors, built once
# as a shared library from that source (a few minutes) and cached in $CACHE_DIR. Against a real
# Kafka broker, plain kcat works.
KCAT_LIB_DIR=""
ensure_promtool() {  # promtool, from Debian's prometheus package (the tests lint /metrics with it)
    command -v promtool >/dev/null && return
    say "installing promtool (Debian's prometheus package)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

ensure_tls_tools() {  # socat (a TLS-terminating proxy in front of the broker) and openssl's CLI (test certificates)
    command -v socat >/dev/null && command -v openssl >/dev/null && return
    say "installing socat and openssl (Debian's packages; the TLS tests use them)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends socat openssl >/dev/null
}

ensure_chromium() {  # Debian's Chromium and ChromeDriver: the monitor's pages are tested in a real browser
    command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
    say "installing chromium and chromium-driver (Debian's packages; the browser tests of the monitor's pages use them)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
}

ensure_cargo_deny() {  # cargo-deny, built from crates.io once (about 2.5 minutes on 2 cores)
    cargo deny --version >/dev/null 2>&1 && return
    say "installing cargo-deny from crates.io (once; about 2.5 minutes)"
    cargo install --locked cargo-deny --version 0.20.2 2>&1 | grep --line-buffered -E '^\s*(Installed|error)' >&2 || true
    cargo deny --version >/dev/null 2>&1 || die "installing cargo-deny failed; run cargo install --locked cargo-deny by hand to see why"
}

# A Docker engine for the Compose run (scripts/compose-test.sh): Debian's docker.io,
# docker-compose and debootstrap, installed when missing, and dockerd started when none answers.
# What this started, stop_docker_engine stops, and removes what dockerd leaves behind: its
# bridges, its iptables chains and rules (iptables-nft), and ip_forward as it was. Debian's CLI
# (/usr/bin/docker) is used throughout: it has BuildKit built in, which a newer CLI without the
# buildx plugin (such as /usr/local/bin/docker on these machines) does not.
DOCKER=/usr/bin/docker
DOCKERD_PID=""
ensure_docker_engine() {
    if [ ! -x /usr/sbin/dockerd ] || [ ! -x "$DOCKER" ] || ! command -v docker-compose >/dev/null ||
        ! command -v debootstrap >/dev/null; then
        say "installing docker.io, docker-compose and debootstrap (Debian's packages)"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            docker.io docker-compose debootstrap >/dev/null
    fi
    if as_root "$DOCKER" info >/dev/null 2>&1; then
        say "a Docker engine answers; using it"
        return
    fi
    DOCKERD_IP_FORWARD=$(sysctl -n net.ipv4.ip_forward)
    DOCKERD_FORWARD_POLICY=$(as_root iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')
    DOCKERD_LOG="$CACHE_DIR/dockerd.log"
    mkdir -p "$CACHE_DIR"
    say "starting dockerd (log: $DOCKERD_LOG); it is stopped, and what it leaves removed, when this command ends"
    # Started directly (not through as_root, a function: `$!` would name the subshell that runs
    # it, and stopping that would leave dockerd running).
    if [ "$(id -u)" = 0 ]; then
        dockerd >"$DOCKERD_LOG" 2>&1 &
    else
        sudo dockerd >"$DOCKERD_LOG" 2>&1 &
    fi
    DOCKERD_PID=$!
    local i
    for i in $(seq 1 60); do
        as_root "$DOCKER" info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 20 "$DOCKERD_LOG" >&2
    die "dockerd did not answer within 30 s (its log is above)"
}

# Stops the dockerd that ensure_docker_engine started (none: nothing to do) and removes what it
# leaves: containers' state stays in /var/lib/docker (the images are the cache of the next run),
# but no bridge, no DOCKER chain or rule, and ip_forward and the FORWARD policy as they were.
stop_docker_engine() {
    [ -n "$DOCKERD_PID" ] || return 0
    say "stopping the dockerd this command started"
    # The one running now: a test may have restarted it (its pid file names it).
    local pid i
    pid=$(cat /var/run/docker.pid 2>/dev/null || echo "$DOCKERD_PID")
    as_root kill "$pid" "$DOCKERD_PID" 2>/dev/null || true
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    as_root pkill -x containerd-shim-runc-v2 2>/dev/null || true
    local bridge
    for bridge in $(ip -o link show type bridge 2>/dev/null | awk -F': ' '{print $2}' | grep -E '^(docker0|br-[0-9a-f]{12})$'); do
        as_root ip link delete "$bridge" 2>/dev/null || true
    done
    # Every rule and chain dockerd made names DOCKER or one of its bridges; the rest stays.
    local table
    for table in filter nat; do
        as_root iptables-save -t "$table" 2>/dev/null |
            grep -v -E 'DOCKER|docker0|br-[0-9a-f]{12}' | as_root iptables-restore -T "$table" 2>/dev/null || true
    done
    [ -n "${DOCKERD_FORWARD_POLICY:-}" ] && as_root iptables -P FORWARD "$DOCKERD_FORWARD_POLICY" 2>/dev/null
    as_root sysctl -q -w net.ipv4.ip_forward="${DOCKERD_IP_FORWARD:-0}" >/dev/null || true
    DOCKERD_PID=""
}

# A Debian bookworm base image, tagged debian:bookworm-slim (what deploy/Dockerfile's runtime
# stage and the stand-in images start from), made once per machine with debootstrap (minbase) and
# `docker import`: no registry can be reached here. The root file system is kept as a tarball in
# the cache, so an engine whose images were removed gets it back in seconds.
ensure_base_image() {
    if as_root "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1; then
        return
    fi
    local tarball="$CACHE_DIR/debian-bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
        say "making a Debian bookworm base image with debootstrap (about a minute, once; cached in $tarball)"
        local rootfs
        rootfs=$(mktemp -d)
        as_root debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$CACHE_DIR/debootstrap.log" 2>&1 ||
            die "debootstrap failed; see $CACHE_DIR/debootstrap.log"
        as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        as_root tar -C "$rootfs" -cf "$tarball.new" .
        as_root rm -rf "$rootfs"
        mv "$tarball.new" "$tarball"
    fi
    say "importing the Debian bookworm base image as debian:bookworm-slim"
    as_root "$DOCKER" import --change 'CMD ["bash"]' "$tarball" debian:bookworm-slim >/dev/null
}

ensure_docker_compose() {  # Debian's docker-compose: the tests validate docker-compose.yml with it
    command -v docker-compose >/dev/null && return
    say "installing docker-compose (Debian's package; only to validate docker-compose.yml)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
}

ensure_kcat() {
    if ! command -v kcat >/dev/null; then
        say "installing kcat from Debian's packages"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq kcat >/dev/null
    fi
    local src version
    src=$(cargo metadata --format-version 1 --manifest-path "$(dirname "${BASH_SOURCE[0]}")/../Cargo.toml" 2>/dev/null |
        python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="rdkafka-sys"))')
    [ -d "$src/librdkafka" ] || die "cannot find the librdkafka source of the rdkafka-sys crate (run cargo fetch)"
    version=$(basename "$src" | sed 's/.*+//')
    KCAT_LIB_DIR="$CACHE_DIR/librdkafka-$version"
    if [ -f "$KCAT_LIB_DIR/librdkafka.so.1" ]; then
        return
    fi
    say "building librdkafka $version as a shared library for kcat (a few minutes, once; cached in $KCAT_LIB_DIR)"
    local build
    build=$(mktemp -d)
    cp -r "$src/librdkafka" "$build/src"
    (
        cd "$build/src"
        ./configure --disable-ssl --disable-sasl --disable-gssapi --disable-zstd --disable-curl \
            --disable-lz4-ext >"$build/configure.log" 2>&1
        make -C src -j"$(nproc)" librdkafka.so.1 >"$build/make.log" 2>&1
    ) || die "building librdkafka failed; see $build/*.log"
    mkdir -p "$KCAT_LIB_DIR"
    cp "$build/src/src/librdkafka.so.1" "$KCAT_LIB_DIR/"
    rm -rf "$build"
}
