#!/usr/bin/env bash
# Sets up Kubernetes auth for reditus-sidecar: the least-privilege policy, the auth
# method pointed at the cluster's API server, and a role that lets one service account
# in one namespace read the product secret. Idempotent: run it again to update.
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
#                              (required; Vault calls its TokenReview API)
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
: "${KUBERNETES_HOST:?setup-kubernetes-auth: set KUBERNETES_HOST (the API server URL)}"
AUTH_MOUNT=${AUTH_MOUNT:-kubernetes}
NAMESPACE=${NAMESPACE:-default}
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-default}

write_policy
enable_auth kubernetes

config=(kubernetes_host="$KUBERNETES_HOST")
[[ -n ${KUBERNETES_CA_CERT:-} ]] && config+=(kubernetes_ca_cert="@$KUBERNETES_CA_CERT")
[[ -n ${TOKEN_REVIEWER_JWT_FILE:-} ]] && config+=(token_reviewer_jwt="@$TOKEN_REVIEWER_JWT_FILE")
[[ ${DISABLE_LOCAL_CA_JWT:-false} == true ]] && config+=(disable_local_ca_jwt=true)
"$cli" write "auth/$AUTH_MOUNT/config" "${config[@]}" >/dev/null
echo "auth/$AUTH_MOUNT talks to $KUBERNETES_HOST" >&2

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
