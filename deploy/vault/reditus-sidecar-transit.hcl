# reditus-sidecar in transit mode (REDITUS_SIDECAR_SECRET_SOURCE=transit): ask Vault for
# the HMAC-SHA512 of a token's signing input with the product's transit key, and nothing
# else. The key itself cannot be read (it is imported with exportable=false), listed,
# rotated or deleted with this policy; `sha2-512` in the path pins the algorithm.
# Looking up and renewing its own token comes from Vault's built-in `default` policy.
# setup-transit.sh rewrites the path below for another TRANSIT_MOUNT / TRANSIT_KEY.
path "transit/hmac/reditus/sha2-512" {
  capabilities = ["update"]
}
