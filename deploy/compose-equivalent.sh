#!/usr/bin/env bash
# deploy/compose.yaml without Docker: the same commands and the same config files, as
# separate processes on 127.0.0.1 (ports 17781-17783; RW_PORT_PREFIX=300 makes them 30081-30083), in a temp
# folder. Config files are copied with three changes only: the broker's service name
# and 0.0.0.0 become 127.0.0.1, the ports move, /keys and /var/lib/respworkers become
# folders of the temp folder. Every process started is stopped by its pid.
#   deploy/compose-equivalent.sh            (rw from .venv/bin, else from PATH)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
if [ -x "$repo/.venv/bin/rw" ]; then PATH="$repo/.venv/bin:$PATH"; fi
prefix="${RW_PORT_PREFIX:-177}"  # ports ${prefix}81, ${prefix}82, ${prefix}83
work="$(mktemp -d "${TMPDIR:-/tmp}/rw-compose-eq.XXXXXX")"
etc="$work/etc/respworkers"
mkdir -p "$etc" "$work/keys" "$work/state"
pids=()
names=()

stop_all() {
    # SIGTERM by pid (a warm stop), newest first; SIGKILL what is left after 30 s.
    local pid i rc
    for ((i=${#pids[@]}-1; i>=0; i--)); do
        pid="${pids[$i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rc=0; wait "$pid" 2>/dev/null || rc=$?
        echo "${names[$i]} (pid $pid) exited $rc"
    done
    pids=()
    sleep 0.2  # the prefixing filters print what the processes wrote last
}
trap 'stop_all' EXIT INT TERM

for f in "$here"/compose/*; do
    sed -e "s#tcp://broker:77#tcp://127.0.0.1:$prefix#" \
        -e "s#tcp://0.0.0.0:77#tcp://127.0.0.1:$prefix#" \
        -e "s#tcp://127.0.0.1:77#tcp://127.0.0.1:$prefix#" \
        -e "s#\"/keys/#\"$work/keys/#" \
        -e "s#/var/lib/respworkers/#$work/state/#" "$f" > "$etc/$(basename "$f")"
done
# The compose services' commands, with /etc/respworkers -> $etc.
run() { echo "+ $*" | sed "s#$etc#/etc/respworkers#g; s#$work/keys#/keys#g"; "$@"; }
start() {  # start NAME CMD...: in the background, output prefixed like docker compose's
    local name="$1"; shift
    echo "+ $* &" | sed "s#$etc#/etc/respworkers#g"
    "$@" > >(sed -u "s/^/$name | /") 2>&1 &
    pids+=("$!")  # rw's own pid: its output goes through the filter
    names+=("$name")
}

echo "== keys (service keys)"
RW_KEYS="$work/keys" run sh "$etc/keys.sh" | sed "s#$work##g"
echo "== broker (service broker)"
start broker rw broker -c "$etc/broker.toml"
for _ in $(seq 60); do
    rw status --once -c "$etc/health.toml" >/dev/null 2>&1 && break
    sleep 0.5
done
echo "+ rw status --once -c /etc/respworkers/health.toml   (the healthcheck)"
rw status --once -c "$etc/health.toml" >/dev/null && echo "healthcheck: healthy"
echo "== pool-a, pool-b"
start pool-a rw worker respworkers.examples:Demo -n 2 -c "$etc/worker-a.toml"
start pool-b rw worker respworkers.examples:Demo -n 2 -c "$etc/worker-b.toml"
echo "== client (one-shot)"
code=0
run sh -c "rw submit $etc/demo-jobs.json --new-ids --no-progress -c $etc/client.toml && rw status --once -c $etc/client.toml" || code=$?
echo "client exited $code"
echo "== stopping (SIGTERM by pid: pools, then the broker)"
stop_all
rm -rf "$work"
exit "$code"
