# reditus-sidecar: read the product secret, and nothing else.
#
# A KV v2 read of the data path returns the latest version together with its metadata
# (version number, deletion and destruction state), which is all the sidecar needs to
# follow rotations: no access to secret/metadata/ is required.
# Looking up and renewing its own token (auth/token/lookup-self, renew-self) is granted
# by Vault's built-in `default` policy, which tokens carry unless a role disables it.
# setup-approle.sh and setup-kubernetes-auth.sh rewrite the path below for another
# KV_MOUNT / KV_PATH.
path "secret/data/reditus" {
  capabilities = ["read"]
}
