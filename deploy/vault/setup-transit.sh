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
#   SECRET_FILE [stdin]       file holding the product secret. Line ends at the very end
#                             (LF or CRLF) are dropped; a byte order mark, a CR anywhere
#                             else or any other control character is refused (exit 1,
#                             nothing imported). It never appears in argv: the CLI reads
#                             it by @path
#   TRANSIT_MOUNT [transit]   transit engine mount (enabled if missing)
#   TRANSIT_KEY [reditus]     key name
#   POLICY [reditus-sidecar-transit]  policy written from reditus-sidecar-transit.hcl
#   ROTATE [false]            true: import the secret as a new version of an existing key
#   VAULT_CLI [bao, else vault, on PATH]
#
# Then bind the policy to the sidecar's auth role: run setup-kubernetes-auth.sh or
# setup-approle.sh with SECRET_SOURCE=transit (and the same TRANSIT_MOUNT / TRANSIT_KEY).
# Prints the REDITUS_SIDECAR_* variables for transit mode (never the secret), and on stderr
# the secret's check value: the first 16 hex digits of HMAC-SHA512(key = secret, message =
# "reditus-sidecar check"), computed here from the secret and by Vault with the imported
# key (the script fails if they differ). Compare it with the secret you hold, e.g.
#   printf %s "$secret" | python3 -c 'import hmac,sys; print(hmac.new(sys.stdin.buffer.read(),
#     b"reditus-sidecar check", "sha512").hexdigest()[:16])'
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

# The check value: the first 16 hex digits of HMAC-SHA512(key = the secret, message =
# "reditus-sidecar check"). It identifies the secret without revealing it.
CHECK_MESSAGE="reditus-sidecar check"
work=$(umask 077 && mktemp -d)
trap 'rm -rf "$work"' EXIT

# sha512_hex: the SHA-512 of stdin, in hex.
sha512_hex() {
    local out
    if command -v sha512sum >/dev/null; then
        out=$(sha512sum)
    elif command -v shasum >/dev/null; then
        out=$(shasum -a 512)
    else
        out=$(openssl dgst -sha512 -r)
    fi
    printf '%s' "${out%% *}"
}

# unhex HEX: the bytes HEX spells, on stdout (printf is a builtin: nothing in argv).
unhex() {
    local hex=$1 escaped='' i
    for ((i = 0; i < ${#hex}; i += 2)); do
        escaped+="\\x${hex:i:2}"
    done
    printf '%b' "$escaped"
}

# local_check: the check value of the bytes on stdin, computed here (HMAC as in RFC 2104,
# with a 128-byte block); the key goes through pipes and builtins only, never argv.
local_check() {
    local key ipad='' opad='' byte i inner
    key=$(od -An -v -tx1 | tr -d ' \n')
    if ((${#key} > 256)); then
        key=$(unhex "$key" | sha512_hex)
    fi
    while ((${#key} < 256)); do
        key+="00"
    done
    for ((i = 0; i < 256; i += 2)); do
        byte=$((16#${key:i:2}))
        printf -v ipad '%s\\x%02x' "$ipad" $((byte ^ 0x36))
        printf -v opad '%s\\x%02x' "$opad" $((byte ^ 0x5c))
    done
    inner=$({ printf '%b' "$ipad" && printf '%s' "$CHECK_MESSAGE"; } | sha512_hex)
    { printf '%b' "$opad" && unhex "$inner"; } | sha512_hex | cut -c1-16
}

# vault_check: the check value of the key's latest version, computed by Vault.
vault_check() {
    local mac
    mac=$("$cli" write -field=hmac "$TRANSIT_MOUNT/hmac/$TRANSIT_KEY/sha2-512" \
        input="$(printf '%s' "$CHECK_MESSAGE" | base64)")
    printf '%s' "${mac##*:}" | base64 -d | od -An -v -tx1 | tr -d ' \n' | cut -c1-16
}

# refuse MESSAGE: stop before anything is imported.
refuse() {
    echo "$name: the product secret $1; nothing was imported" >&2
    exit 1
}

# read_secret: the product secret from SECRET_FILE or stdin into `secret`. Line ends at the
# very end (LF or CRLF, as an editor leaves them) are dropped; anything else that is not a
# printable character is refused, since it would become part of the key and Reditus would
# reject every token signed with it.
read_secret() {
    local LC_ALL=C raw="$work/raw" before
    if [[ -n ${SECRET_FILE:-} ]]; then
        cat -- "$SECRET_FILE" >"$raw"
    else
        cat >"$raw"
    fi
    # A shell variable cannot hold NUL: count them in the file before reading it.
    if [[ $(tr -cd '\000' <"$raw" | wc -c) -ne 0 ]]; then
        refuse "contains a NUL byte (a binary or UTF-16 file?): save it as UTF-8 text"
    fi
    secret=$(cat -- "$raw" && printf x)
    rm -f -- "$raw"
    secret=${secret%x}
    while [[ $secret == *$'\n' ]]; do
        secret=${secret%$'\n'}
        secret=${secret%$'\r'}
    done
    if [[ -z $secret ]]; then
        refuse "is empty (SECRET_FILE or stdin)"
    fi
    if [[ $secret == $'\xef\xbb\xbf'* ]]; then
        refuse "starts with a UTF-8 byte order mark (bytes EF BB BF): save the file as UTF-8 without BOM"
    fi
    if [[ $secret == *$'\xef\xbb\xbf'* ]]; then
        before=${secret%%$'\xef\xbb\xbf'*}
        refuse "contains a UTF-8 byte order mark (bytes EF BB BF) at byte $((${#before} + 1))"
    fi
    if [[ $secret == *$'\r'* ]]; then
        before=${secret%%$'\r'*}
        refuse "contains a carriage return (CR, 0x0d) at byte $((${#before} + 1)); only a line end (LF or CRLF) at the very end is dropped"
    fi
    if [[ $secret == *[[:cntrl:]]* ]]; then
        before=${secret%%[[:cntrl:]]*}
        refuse "$(printf 'contains the control character 0x%02x at byte %d; only a line end (LF or CRLF) at the very end is dropped' \
            "'${secret:${#before}:1}" $((${#before} + 1)))"
    fi
    if [[ $secret == *$'\xc2'[$'\x80'-$'\x9f']* ]]; then
        before=${secret%%$'\xc2'[$'\x80'-$'\x9f']*}
        refuse "contains a C1 control character (U+0080 to U+009F) at byte $((${#before} + 1))"
    fi
}

# import_key COMMAND: the secret's UTF-8 bytes, base64 in a 0600 temporary file, handed
# to the CLI as @file (the CLI wraps it with the engine's wrapping key before sending).
# Then Vault computes the check value with the imported key: it must equal the one
# computed here from the secret (else the key does not hold the intended bytes). Sets
# `check` to it.
import_key() {
    local secret expected actual
    read_secret
    expected=$(printf '%s' "$secret" | local_check)
    printf '%s' "$secret" | base64 | tr -d '\n' >"$work/key"
    unset secret
    "$cli" transit "$1" "$TRANSIT_MOUNT/keys/$TRANSIT_KEY" "@$work/key" \
        type=hmac exportable=false allow_plaintext_backup=false >/dev/null
    rm -f -- "$work/key"
    actual=$(vault_check)
    if [[ $actual != "$expected" ]]; then
        echo "$name: Vault's key gives the check value $actual, the secret given $expected:" \
            "the imported key is not the intended secret; do not use it (delete it, or import" \
            "the secret again with ROTATE=true)" >&2
        exit 1
    fi
    check=$expected
}

if ! "$cli" read -format=json "$TRANSIT_MOUNT/keys/$TRANSIT_KEY" >/dev/null 2>&1; then
    import_key import
    echo "imported the product secret as $TRANSIT_MOUNT/keys/$TRANSIT_KEY (type hmac, not exportable)" >&2
    echo "check value $check (from the secret here and from the key in Vault: equal)" >&2
elif [[ $ROTATE == true ]]; then
    import_key import-version
    latest=$("$cli" read -field=latest_version "$TRANSIT_MOUNT/keys/$TRANSIT_KEY")
    echo "imported the new secret as version $latest of $TRANSIT_MOUNT/keys/$TRANSIT_KEY" >&2
    echo "check value $check (from the secret here and from the key in Vault: equal)" >&2
else
    echo "$TRANSIT_MOUNT/keys/$TRANSIT_KEY exists: left alone (ROTATE=true imports a new version)" >&2
    echo "check value $(vault_check) (of its latest version, computed by Vault)" >&2
fi

write_policy
print_source_env
