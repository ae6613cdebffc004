#!/usr/bin/env bash
# Sets up transit mode for reditus-sidecar: the transit engine, the product secret imported
# as a non-exportable HMAC key, and the least-privilege policy. Idempotent: an existing key
# is left alone unless ROTATE=true, which imports the secret as the key's next version.
#
#   VAULT_ADDR=https://vault.example:8200 VAULT_TOKEN=<admin token> \
#     SECRET_FILE=./product-secret deploy/vault/setup-transit.sh
#   ... or pipe the secret in:  some-password-manager get reditus | deploy/vault/setup-transit.sh
#
# Environment (default in brackets):
#   VAULT_ADDR, VAULT_TOKEN   the Vault (or OpenBao) to configure, and a token allowed to
#                             enable engines, import keys and write policies
#   SECRET_FILE [stdin]       file holding the product secret (trailing newlines are
#                             dropped). It never appears in argv: the CLI reads it by @path
#   TRANSIT_MOUNT [transit]   transit engine mount (enabled if missing)
#   TRANSIT_KEY [reditus]     key name
#   POLICY [reditus-sidecar-transit]  policy written from reditus-sidecar-transit.hcl
#   ROTATE [false]            true: import the secret as a new version of an existing key
#   VAULT_CLI [bao, else vault, on PATH]
#
# Then bind the policy to the sidecar's auth role: run setup-kubernetes-auth.sh or
# setup-approle.sh with SECRET_SOURCE=transit (and the same TRANSIT_MOUNT / TRANSIT_KEY).
# Prints the REDITUS_SIDECAR_* variables for transit mode (never the secret).
set -euo pipefail
name=setup-transit
here=$(cd "$(dirname "$0")" && pwd)
SECRET_SOURCE=transit
# shellcheck source=common.sh
source "$here/common.sh"
ROTATE=${ROTATE:-false}

mounts=$("$cli" secrets list -format=json)
if [[ $mounts != *"\"${TRANSIT_MOUNT}/\""* ]]; then
    "$cli" secrets enable -path="$TRANSIT_MOUNT" transit >/dev/null
    echo "enabled transit at $TRANSIT_MOUNT/" >&2
fi

# import_key COMMAND: the secret's UTF-8 bytes, base64 in a 0600 temporary file, handed
# to the CLI as @file (the CLI wraps it with the engine's wrapping key before sending).
import_key() {
    local tmp secret
    tmp=$(umask 077 && mktemp)
    trap 'rm -f "$tmp"' RETURN
    if [[ -n ${SECRET_FILE:-} ]]; then
        secret=$(<"$SECRET_FILE")
    else
        secret=$(cat)
    fi
    if [[ -z $secret ]]; then
        echo "$name: the product secret is empty (SECRET_FILE or stdin)" >&2
        exit 1
    fi
    printf '%s' "$secret" | base64 | tr -d '\n' >"$tmp"
    unset secret
    "$cli" transit "$1" "$TRANSIT_MOUNT/keys/$TRANSIT_KEY" "@$tmp" \
        type=hmac exportable=false allow_plaintext_backup=false >/dev/null
}

if ! "$cli" read -format=json "$TRANSIT_MOUNT/keys/$TRANSIT_KEY" >/dev/null 2>&1; then
    import_key import
    echo "imported the product secret as $TRANSIT_MOUNT/keys/$TRANSIT_KEY (type hmac, not exportable)" >&2
elif [[ $ROTATE == true ]]; then
    import_key import-version
    latest=$("$cli" read -field=latest_version "$TRANSIT_MOUNT/keys/$TRANSIT_KEY")
    echo "imported the new secret as version $latest of $TRANSIT_MOUNT/keys/$TRANSIT_KEY" >&2
else
    echo "$TRANSIT_MOUNT/keys/$TRANSIT_KEY exists: left alone (ROTATE=true imports a new version)" >&2
fi

write_policy
print_source_env
