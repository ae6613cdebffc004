# shellcheck shell=bash
# Sourced (not run) by setup-approle.sh and setup-kubernetes-auth.sh: what both do the same
# way. The caller sets `name` (for messages) and `here` (this folder) before sourcing.

cli=${VAULT_CLI:-$(command -v bao || command -v vault || true)}
if [[ -z $cli ]]; then
    echo "$name: neither bao nor vault is on PATH (set VAULT_CLI)" >&2
    exit 1
fi
: "${VAULT_ADDR:?$name: set VAULT_ADDR}"
# SECRET_SOURCE=transit: the policy and variables of transit mode (see setup-transit.sh).
SECRET_SOURCE=${SECRET_SOURCE:-vault}
KV_MOUNT=${KV_MOUNT:-secret}
KV_PATH=${KV_PATH:-reditus}
TRANSIT_MOUNT=${TRANSIT_MOUNT:-transit}
TRANSIT_KEY=${TRANSIT_KEY:-reditus}
if [[ $SECRET_SOURCE == transit ]]; then
    POLICY=${POLICY:-reditus-sidecar-transit}
else
    POLICY=${POLICY:-reditus-sidecar}
fi
ROLE=${ROLE:-reditus-sidecar}

# write_policy: reditus-sidecar.hcl names secret/data/reditus (reditus-sidecar-transit.hcl
# transit/hmac/reditus/sha2-512); point it at the configured place and write it as POLICY.
write_policy() {
    if [[ $SECRET_SOURCE == transit ]]; then
        local hmac_path="${TRANSIT_MOUNT}/hmac/${TRANSIT_KEY}/sha2-512"
        sed "s#\"transit/hmac/reditus/sha2-512\"#\"${hmac_path}\"#" \
            "$here/reditus-sidecar-transit.hcl" | "$cli" policy write "$POLICY" - >/dev/null
        echo "policy $POLICY: update on $hmac_path" >&2
        return
    fi
    sed "s#\"secret/data/reditus\"#\"${KV_MOUNT}/data/${KV_PATH}\"#" "$here/reditus-sidecar.hcl" \
        | "$cli" policy write "$POLICY" - >/dev/null
    echo "policy $POLICY: read on ${KV_MOUNT}/data/${KV_PATH}" >&2
}

# enable_auth TYPE: enable the auth method TYPE at AUTH_MOUNT unless that path is taken.
enable_auth() {
    local mounts
    # Captured first: `grep -q` closing the pipe early would fail the pipeline under pipefail.
    mounts=$("$cli" auth list -format=json)
    if [[ $mounts != *"\"${AUTH_MOUNT}/\""* ]]; then
        "$cli" auth enable -path="$AUTH_MOUNT" "$1" >/dev/null
        echo "enabled $1 auth at auth/$AUTH_MOUNT" >&2
    fi
}

# print_env METHOD [VAR=VALUE...]: the sidecar's variables on stdout (never a secret).
print_env() {
    echo "REDITUS_SIDECAR_VAULT_AUTH=$1"
    echo "REDITUS_SIDECAR_VAULT_AUTH_MOUNT=$AUTH_MOUNT"
    shift
    printf 'REDITUS_SIDECAR_%s\n' "$@"
    print_source_env
}

# print_source_env: where the secret is, as the sidecar's variables.
print_source_env() {
    if [[ $SECRET_SOURCE == transit ]]; then
        echo "REDITUS_SIDECAR_SECRET_SOURCE=transit"
        echo "REDITUS_SIDECAR_TRANSIT_MOUNT=$TRANSIT_MOUNT"
        echo "REDITUS_SIDECAR_TRANSIT_KEY=$TRANSIT_KEY"
    else
        echo "REDITUS_SIDECAR_KV_MOUNT=$KV_MOUNT"
        echo "REDITUS_SIDECAR_KV_PATH=$KV_PATH"
    fi
}
