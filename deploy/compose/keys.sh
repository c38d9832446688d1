#!/bin/sh
# Key pairs (rw keygen) and the broker's per-role folders of allowed public keys, made
# once into the "keys" volume. In production each secret key exists only on its own
# host; a shared volume is for this demo only.
set -eu
K=${RW_KEYS:-/keys}
if [ -f "$K/broker.key_secret" ]; then
    echo "keys: already made"
    exit 0
fi
for name in broker client health worker-a worker-b; do
    rw keygen "$name" -d "$K"
done
mkdir -p "$K/allowed-clients" "$K/allowed-workers" "$K/allowed-status"
cp "$K/client.key" "$K/allowed-clients/"                          # may submit
cp "$K/worker-a.key" "$K/worker-b.key" "$K/allowed-workers/"      # may take jobs
cp "$K/client.key" "$K/health.key" "$K/allowed-status/"           # may read the status
echo "keys: made"; ls -R "$K"
