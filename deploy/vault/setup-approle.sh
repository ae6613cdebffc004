#!/usr/bin/env bash
# Sets up AppRole auth for reditus-sidecar: the least-privilege policy, the auth method,
# a role bound to the policy. Idempotent: run it again to update TTLs or the KV path.
#
#   VAULT_ADDR=https://vault.example:8200 VAULT_TOKEN=<admin token> \
#     SECRET_ID_FILE=./secret-id deploy/vault/setup-approle.sh
#
# Environment (default in brackets):
#   VAULT_ADDR, VAULT_TOKEN   the Vault (or OpenBao) to configure, and a token allowed to
#                             write policies and auth configuration (also VAULT_CACERT,
#                             VAULT_NAMESPACE: the CLI honours them)
#   KV_MOUNT [secret]         KV v2 mount holding the product secret
#   KV_PATH [reditus]         path of the product secret inside that mount
#   POLICY [reditus-sidecar]  name of the policy written from reditus-sidecar.hcl
#   SECRET_SOURCE [vault]     transit: write and bind reditus-sidecar-transit.hcl instead
#                             (POLICY defaults to reditus-sidecar-transit; TRANSIT_MOUNT
#                             [transit] and TRANSIT_KEY [reditus] name the key)
#   AUTH_MOUNT [approle]      path AppRole is (or gets) enabled at
#   ROLE [reditus-sidecar]    AppRole role name
#   TOKEN_TTL [1h]            lifetime of the sidecar's tokens (it renews at 2/3 of it)
#   TOKEN_MAX_TTL [24h]       past this the sidecar logs in again with the secret id
#   SECRET_ID_TTL [0]         lifetime of secret ids; 0 = no expiry
#   SECRET_ID_FILE [unset]    if set, a new secret id is written there (mode 0600); hand it
#                             to the sidecar as REDITUS_SIDECAR_VAULT_SECRET_ID_FILE
#   VAULT_CLI [bao, else vault, on PATH]
#
# Prints the REDITUS_SIDECAR_* variables the sidecar needs (never the secret id).
set -euo pipefail
name=setup-approle
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
AUTH_MOUNT=${AUTH_MOUNT:-approle}

write_policy
enable_auth approle

"$cli" write "auth/$AUTH_MOUNT/role/$ROLE" \
    token_policies="$POLICY" \
    token_ttl="${TOKEN_TTL:-1h}" \
    token_max_ttl="${TOKEN_MAX_TTL:-24h}" \
    secret_id_ttl="${SECRET_ID_TTL:-0}" >/dev/null
echo "role $ROLE at auth/$AUTH_MOUNT bound to policy $POLICY" >&2
role_id=$("$cli" read -field=role_id "auth/$AUTH_MOUNT/role/$ROLE/role-id")

if [[ -n ${SECRET_ID_FILE:-} ]]; then
    (
        umask 077
        "$cli" write -f -field=secret_id "auth/$AUTH_MOUNT/role/$ROLE/secret-id" >"$SECRET_ID_FILE"
    )
    echo "new secret id written to $SECRET_ID_FILE" >&2
fi

print_env approle "VAULT_ROLE_ID=$role_id"
