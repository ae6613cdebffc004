"""The token is byte-identical to the Reditus guide's `jose` code, for every input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidecar.signer
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from tests.support import JoseSigner

SECRET = "0f3c7e1b9a2d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071"
USER_IDS = [
    "u-123",
    "42",
    "Zoë Åström",
    "用户-七",
    "emoji 😀👩‍👩‍👧",
    'quote " and \\ backslash',
    "<script>alert('x')</script>&amp;",
    "/slashes/and/../dots",
    "line\u2028separator\u2029paragraph",
    "x" * 256,
    "é" * 256,
    "😀" * 256,
    " leading and trailing ",
    "\ufeffbom",
]
PRODUCT_IDS = [
    "prod-1",
    "c7a1f6c2-5e0f-4c4b-9a3e-1f2d3c4b5a69",
    'weird "id" \\ with\ttab\nnewline\x00nul\x7f\x9f',
    "ünïcödé 😀",
    "lone \ud800 surrogate",
]
SECRETS = [
    SECRET,
    "x",
    "short",
    "k" * 1000,
    "sécrèt 🔑",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    '{"kty":"oct","k":"abc"}',
    "lone \udfff surrogate",
]


@pytest.mark.parametrize("user_id", USER_IDS)
def test_user_ids_match_jose(jose: JoseSigner, user_id: str) -> None:
    ours = TokenSigner("prod-1", Redacted(SECRET)).sign(user_id, 1795460465)
    assert ours == jose.sign(SECRET, "prod-1", user_id, 1795460465)


@pytest.mark.parametrize("product_id", PRODUCT_IDS)
def test_product_ids_match_jose(jose: JoseSigner, product_id: str) -> None:
    ours = TokenSigner(product_id, Redacted(SECRET)).sign("u-1", 1700000000)
    assert ours == jose.sign(SECRET, product_id, "u-1", 1700000000)


@pytest.mark.parametrize("secret", SECRETS, ids=range(len(SECRETS)))
def test_secrets_of_any_length_and_shape_match_jose(jose: JoseSigner, secret: str) -> None:
    ours = TokenSigner("prod-1", Redacted(secret)).sign("u-1", 1700000000)
    assert ours == jose.sign(secret, "prod-1", "u-1", 1700000000)


def test_exp_follows_iat_when_ttl_is_set(jose: JoseSigner) -> None:
    token = TokenSigner("prod-1", Redacted(SECRET), ttl=300).sign("u-1", 1700000000)
    assert token == jose.sign(SECRET, "prod-1", "u-1", 1700000000, exp=1700000300)
    claims = jwt.decode(token, SECRET, algorithms=["HS512"], options={"verify_exp": False})
    assert list(claims) == ["ProductId", "UserId", "iat", "exp"]
    assert claims["exp"] - claims["iat"] == 300


def test_no_exp_by_default_and_exact_layout() -> None:
    token = TokenSigner("prod-1", Redacted(SECRET)).sign("u-1", 1795460465)
    header, payload, _signature = token.split(".")
    assert jwt.utils.base64url_decode(header) == b'{"alg":"HS512","typ":"JWT"}'
    assert jwt.utils.base64url_decode(payload) == (
        b'{"ProductId":"prod-1","UserId":"u-1","iat":1795460465}'
    )
    assert "=" not in token


def test_pyjwt_verifies_and_rejects_another_secret() -> None:
    token = TokenSigner("prod-1", Redacted(SECRET)).sign("Zoë", 1795460465)
    claims = jwt.decode(token, SECRET, algorithms=["HS512"])
    assert claims == {"ProductId": "prod-1", "UserId": "Zoë", "iat": 1795460465}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, SECRET + "x", algorithms=["HS512"])


def test_signing_a_short_secret_warns_once_not_per_token(recwarn: pytest.WarningsRecorder) -> None:
    signer = TokenSigner("prod-1", Redacted("short"))
    for i in range(100):
        signer.sign(f"u-{i}", 1700000000 + i)
    # Only warnings raised here or in the signer count: the recorder is process-wide, and
    # objects of earlier tests (collected now, or in their leftover threads) may warn too.
    ours = [w for w in recwarn if w.filename in (__file__, sidecar.signer.__file__)]
    assert ours == []
    assert signer.key_length_warning is not None
    assert "below" in signer.key_length_warning
    assert TokenSigner("p", Redacted(SECRET)).key_length_warning is None


def test_the_key_length_advice_starts_below_64_bytes_of_utf8() -> None:
    """RFC 7518's minimum is 64 bytes of key, counted after UTF-8 encoding, not characters."""
    assert TokenSigner("p", Redacted("k" * 64)).key_length_warning is None
    assert TokenSigner("p", Redacted("é" * 32)).key_length_warning is None  # 64 bytes
    short = TokenSigner("p", Redacted("k" * 63)).key_length_warning
    assert short is not None
    assert "63 bytes" in short


def test_same_key_tells_apart_product_id_secret_and_ttl() -> None:
    """Rotation detection: a change of any of the three must install a new signer."""
    base = TokenSigner("prod-1", Redacted(SECRET), ttl=60)
    assert base.same_key(TokenSigner("prod-1", Redacted(SECRET), ttl=60))
    assert not base.same_key(TokenSigner("prod-2", Redacted(SECRET), ttl=60))
    assert not base.same_key(TokenSigner("prod-1", Redacted(SECRET + "x"), ttl=60))
    assert not base.same_key(TokenSigner("prod-1", Redacted(SECRET), ttl=0))


def test_repr_hides_the_secret() -> None:
    signer = TokenSigner("prod-1", Redacted(SECRET))
    assert SECRET not in repr(signer)
    assert SECRET not in repr(Redacted(SECRET))
    assert SECRET not in str(Redacted(SECRET))


# Valid user ids: 1..256 code points, no control characters, no surrogates.
user_id_text = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=256
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    user_id=user_id_text,
    product_id=st.text(min_size=1, max_size=64),
    secret=st.text(min_size=1, max_size=200),
    iat=st.integers(min_value=0, max_value=2**40),
)
def test_generated_inputs_match_jose(
    jose: JoseSigner, user_id: str, product_id: str, secret: str, iat: int
) -> None:
    ours = TokenSigner(product_id, Redacted(secret)).sign(user_id, iat)
    assert ours == jose.sign(secret, product_id, user_id, iat)


# --- one signer, many tokens --------------------------------------------------------------
# The signer keeps per-secret state between tokens (the header segment, the payload prefix,
# a keyed HMAC it copies per token). A slip there (an HMAC object reused instead of copied,
# a cached payload) leaves the first token right and the later ones wrong (issue 19): every
# test above signs one token per signer, so these sign many with the same one.

IN_A_ROW = [  # different users, the same user at another iat, an exact repeat, unicode
    ("u-1", 1700000000),
    ("u-2", 1700000000),
    ("u-1", 1700000001),
    ("u-1", 1700000000),
    ("Zoë Åström", 1795460465),
    ("用户-七", 1795460466),
    ("x" * 256, 1795460467),
    ("u-1", 1700000000),
]


def independent_token(secret: str, product_id: str, user_id: str, iat: int, ttl: int) -> str:
    """HS512 from scratch, sharing nothing with sidecar.signer: json.dumps for the claims
    (the same bytes as JSON.stringify for these inputs), a fresh HMAC-SHA512 per token."""

    def segment(value: dict[str, object]) -> bytes:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=")

    claims: dict[str, object] = {"ProductId": product_id, "UserId": user_id, "iat": iat}
    if ttl:
        claims["exp"] = iat + ttl
    signing_input = segment({"alg": "HS512", "typ": "JWT"}) + b"." + segment(claims)
    mac = hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha512).digest()
    return (signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode("ascii")


@pytest.mark.parametrize("ttl", [0, 300])
def test_every_token_of_one_signer_matches_a_fresh_hmac(ttl: int) -> None:
    signer = TokenSigner("prod-1", Redacted(SECRET), ttl=ttl)
    for round_ in range(3):  # and the same sequence again: nothing accumulates per token
        for i, (user_id, iat) in enumerate(IN_A_ROW):
            expected = independent_token(SECRET, "prod-1", user_id, iat, ttl)
            assert signer.sign(user_id, iat) == expected, f"token {i} of round {round_}"


def test_every_token_of_one_signer_matches_jose(jose: JoseSigner) -> None:
    signer = TokenSigner("prod-1", Redacted(SECRET))
    ours = [signer.sign(user_id, iat) for user_id, iat in IN_A_ROW]
    theirs = [jose.sign(SECRET, "prod-1", user_id, iat) for user_id, iat in IN_A_ROW]
    for i, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == reference, f"token {i} in a row"
    assert ours[0] == ours[3] == ours[7]  # the same user and iat: the same token
    assert len(set(ours)) == 6


def test_two_signers_in_turn_do_not_share_state() -> None:
    """Two products signing alternately (two snapshots alive at once) stay independent."""
    first = TokenSigner("prod-1", Redacted(SECRET))
    second = TokenSigner("prod-2", Redacted("another-" + SECRET), ttl=60)
    for user_id, iat in IN_A_ROW:
        assert first.sign(user_id, iat) == independent_token(SECRET, "prod-1", user_id, iat, 0)
        assert second.sign(user_id, iat) == independent_token(
            "another-" + SECRET, "prod-2", user_id, iat, 60
        )
