#!/usr/bin/env bash
# Sets up Kubernetes auth for reditus-sidecar: the least-privilege policy, the auth
# method pointed at the cluster's API server, and a role that lets one service account
# in one namespace read the product secret. Idempotent: run it again to update.
#
# An auth method that is already configured is often shared (a platform team's mount, many
# teams' roles): its config (auth/AUTH_MOUNT/config: API server, CA, token reviewer JWT) is
# then kept as it is, and only the policy and this role are written. The config is written
# when the mount is new or has none, or when OVERWRITE_AUTH_CONFIG=true asks for it.
#
#   VAULT_ADDR=https://vault.example:8200 VAULT_TOKEN=<admin token> \
#     KUBERNETES_HOST=https://kubernetes.default.svc NAMESPACE=shop \
#     SERVICE_ACCOUNT=shop-reditus-sidecar AUDIENCE=vault deploy/vault/setup-kubernetes-auth.sh
#
# (the Helm chart's service account is <release>-reditus-sidecar, its token's audience vault)
#
# Environment (default in brackets):
#   VAULT_ADDR, VAULT_TOKEN    the Vault (or OpenBao) to configure, and a token allowed to
#                              write policies and auth configuration
#   KUBERNETES_HOST            URL of the Kubernetes API server as Vault reaches it
#                              (Vault calls its TokenReview API); required when the
#                              config is written, unused when an existing one is kept
#   KUBERNETES_CA_CERT [unset] PEM file of the API server's CA; unset when Vault runs in
#                              the cluster and uses its own service-account CA
#   TOKEN_REVIEWER_JWT_FILE [unset]  a long-lived token allowed to create TokenReviews;
#                              unset: Vault uses its own pod's token, or the client's
#   DISABLE_LOCAL_CA_JWT [false]  true when Vault runs outside the cluster
#   NAMESPACE [default]        namespace of the app's pods
#   SERVICE_ACCOUNT [default]  service account of the pods (the chart's: <release>-reditus-sidecar)
#   AUDIENCE [unset]           required `aud` of the service-account token, if any
#   KV_MOUNT [secret], KV_PATH [reditus]   where the product secret lives (KV v2)
#   POLICY [reditus-sidecar]   name of the policy written from reditus-sidecar.hcl
#   SECRET_SOURCE [vault]      transit: write and bind reditus-sidecar-transit.hcl instead
#                              (POLICY defaults to reditus-sidecar-transit; TRANSIT_MOUNT
#                              [transit] and TRANSIT_KEY [reditus] name the key)
#   AUTH_MOUNT [kubernetes]    path the Kubernetes method is (or gets) enabled at
#   OVERWRITE_AUTH_CONFIG [false]  true: write auth/AUTH_MOUNT/config even though it is
#                              already configured. It replaces the whole config, so a
#                              setting not given here (a token reviewer JWT, a CA, an
#                              issuer) is reset, for every role on that mount
#   ROLE [reditus-sidecar]     role name (REDITUS_SIDECAR_VAULT_ROLE)
#   TOKEN_TTL [1h], TOKEN_MAX_TTL [24h]   the sidecar renews at 2/3, logs in again after
#   VAULT_CLI [bao, else vault, on PATH]
#
# Prints the REDITUS_SIDECAR_* variables the sidecar needs.
set -euo pipefail
name=setup-kubernetes-auth
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"
AUTH_MOUNT=${AUTH_MOUNT:-kubernetes}
NAMESPACE=${NAMESPACE:-default}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}
OVERWRITE_AUTH_CONFIG=${OVERWRITE_AUTH_CONFIG:-false}
if [[ $OVERWRITE_AUTH_CONFIG != true && $OVERWRITE_AUTH_CONFIG != false ]]; then
    echo "$name: OVERWRITE_AUTH_CONFIG must be true or false, not '$OVERWRITE_AUTH_CONFIG'" >&2
    exit 1
fi

# The API server the mount's config names; empty when the mount is new or unconfigured.
# Anything else that stops the read (a 403, Vault down) stops the script: an unreadable
# config is not taken for a missing one, so it is never overwritten by mistake.
if ! current_host=$("$cli" read -field=kubernetes_host "auth/$AUTH_MOUNT/config" 2>&1); then
    if [[ $current_host != "No value found at "* ]]; then
        echo "$name: cannot read auth/$AUTH_MOUNT/config, so cannot tell whether it is" \
            "configured; nothing was changed: $current_host" >&2
        exit 1
    fi
    current_host=
fi
if [[ -z $current_host || $OVERWRITE_AUTH_CONFIG == true ]]; then
    : "${KUBERNETES_HOST:?$name: set KUBERNETES_HOST (the API server URL)}"
fi

write_policy
enable_auth kubernetes

if [[ -n $current_host && $OVERWRITE_AUTH_CONFIG != true ]]; then
    echo "auth/$AUTH_MOUNT is already configured (kubernetes_host=$current_host): its config" \
        "is kept as it is, for every role on the mount" >&2
    ignored=()
    for var in KUBERNETES_HOST KUBERNETES_CA_CERT TOKEN_REVIEWER_JWT_FILE DISABLE_LOCAL_CA_JWT; do
        [[ -n ${!var:-} ]] && ignored+=("$var")
    done
    if ((${#ignored[@]})); then
        echo "  not used: ${ignored[*]}" >&2
    fi
    if [[ -n ${KUBERNETES_HOST:-} && $KUBERNETES_HOST != "$current_host" ]]; then
        echo "  KUBERNETES_HOST=$KUBERNETES_HOST differs from the mount's kubernetes_host" >&2
    fi
    echo "  the role works if that API server is the one of the cluster where $NAMESPACE/$SERVICE_ACCOUNT" \
        "runs. If it is not, use another AUTH_MOUNT for that cluster, or ask the mount's owners;" \
        "OVERWRITE_AUTH_CONFIG=true replaces the whole config (settings not given here, such as" \
        "a token reviewer JWT, are reset for every role on the mount)" >&2
else
    config=(kubernetes_host="$KUBERNETES_HOST")
    [[ -n ${KUBERNETES_CA_CERT:-} ]] && config+=(kubernetes_ca_cert="@$KUBERNETES_CA_CERT")
    [[ -n ${TOKEN_REVIEWER_JWT_FILE:-} ]] && config+=(token_reviewer_jwt="@$TOKEN_REVIEWER_JWT_FILE")
    [[ ${DISABLE_LOCAL_CA_JWT:-false} == true ]] && config+=(disable_local_ca_jwt=true)
    "$cli" write "auth/$AUTH_MOUNT/config" "${config[@]}" >/dev/null
    if [[ -n $current_host ]]; then
        echo "auth/$AUTH_MOUNT config replaced (OVERWRITE_AUTH_CONFIG=true; it named $current_host)" >&2
    fi
    echo "auth/$AUTH_MOUNT talks to $KUBERNETES_HOST" >&2
fi

role=(
    bound_service_account_names="$SERVICE_ACCOUNT"
    bound_service_account_namespaces="$NAMESPACE"
    token_policies="$POLICY"
    token_ttl="${TOKEN_TTL:-1h}"
    token_max_ttl="${TOKEN_MAX_TTL:-24h}"
)
[[ -n ${AUDIENCE:-} ]] && role+=(audience="$AUDIENCE")
"$cli" write "auth/$AUTH_MOUNT/role/$ROLE" "${role[@]}" >/dev/null
echo "role $ROLE: service account $NAMESPACE/$SERVICE_ACCOUNT -> policy $POLICY" >&2

print_env kubernetes "VAULT_ROLE=$ROLE"
