#!/bin/sh
# The compose demo profile's OpenBao (compose.yaml, service `openbao`): a dev server, in
# memory, on 127.0.0.1:8200 of the sidecar's network namespace, seeded as
# `reditus-sidecar demo` seeds its own:
#   - the product secret from /run/secrets/reditus-product-secret (JSON with product_id and
#     product_secret) at KV v2 secret/reditus;
#   - the policy reditus-sidecar (deploy/vault/reditus-sidecar.hcl: read on that path only);
#   - AppRole role reditus-sidecar with role id $ROLE_ID and, as its secret id, the one in
#     /run/secrets/reditus-approle-secret-id (a custom secret id: the sidecar reads the
#     same file).
# The root token is random, made here, kept in /tmp/root-token (the container's tmpfs,
# mode 0600; the dev server also prints it in its log, as dev servers do) and passed to no
# other container. /tmp/seeded marks the end of the seeding
# (the service's health check). POSIX sh: runs in the official image (Alpine) as in a
# Debian one.
set -eu
umask 077
export BAO_ADDR="${BAO_ADDR:-http://127.0.0.1:8200}"
policy=/etc/openbao-demo/reditus-sidecar.hcl
product=/run/secrets/reditus-product-secret
secret_id=/run/secrets/reditus-approle-secret-id
role=reditus-sidecar

say() { echo "[openbao-demo] $*"; }

LC_ALL=C tr -dc 'a-f0-9' </dev/urandom | head -c 48 >/tmp/root-token
BAO_DEV_ROOT_TOKEN_ID=$(cat /tmp/root-token) \
    bao server -dev -dev-no-store-token -dev-listen-address=127.0.0.1:8200 &
server=$!
# docker/podman stop: SIGTERM to this script (PID 1), handed on to the server.
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' TERM INT
BAO_TOKEN=$(cat /tmp/root-token)
export BAO_TOKEN

# Up within 30 s (about 1 s usually), or give up.
tries=0
until bao status >/dev/null 2>&1; do
    kill -0 "$server" 2>/dev/null || { say "the dev server exited"; exit 1; }
    tries=$((tries + 1))
    [ "$tries" -le 300 ] || { say "the dev server did not answer within 30 s"; exit 1; }
    sleep 0.1
done

bao kv put -mount=secret reditus "@$product" >/dev/null
bao policy write "$role" "$policy" >/dev/null
bao auth enable approle >/dev/null
bao write "auth/approle/role/$role" token_policies="$role" \
    token_ttl=20m token_max_ttl=1h secret_id_ttl=0 >/dev/null
bao write "auth/approle/role/$role/role-id" role_id="$ROLE_ID" >/dev/null
# The secret id on stdin (`-`), never in argv.
tr -d '\r\n' <"$secret_id" | bao write "auth/approle/role/$role/custom-secret-id" secret_id=- >/dev/null
say "seeded secret/reditus, policy $role (read on secret/data/reditus only), AppRole $role (role id $ROLE_ID)"
: >/tmp/seeded

wait "$server"
