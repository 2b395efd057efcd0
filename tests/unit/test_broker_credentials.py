"""agent.broker.credentials: HMAC service credentials (patent Fig. 10, 164) as an object
verifies them — forged, tampered, expired, revoked, for another service or instance."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.broker.credentials import Claims, RevocationList, ServiceKeys, Verifier, issue
from agent.broker.errors import BadRequest, CredentialError

NOW = 1_700_000_000.0
KEY = b"k" * 32
OTHER_KEY = b"o" * 32
CLAIMS = Claims("lease-1", "text2html", "t2h@r1", NOW + 60, "co1")


def reason(verifier: Verifier, token, service="text2html", **kwargs) -> str:
    with pytest.raises(CredentialError) as err:
        verifier.verify(token, service, NOW, **kwargs)
    return err.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_a_genuine_credential_verifies_to_its_lease_and_expiry() -> None:
    verified = Verifier({"text2html": KEY}).verify(issue(CLAIMS, KEY), "text2html", NOW,
                                                   instance="t2h@r1")
    assert (verified.lease_id, verified.expires_at, verified.holder) == ("lease-1", NOW + 60,
                                                                         "co1")


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token) -> None:
    assert reason(Verifier({"text2html": KEY}), token) == "missing"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "x" * 2000, "..", "é.é", 42,
                                   b64(b"{}") + "." + b64(b"mac")])
def test_malformed_is_forged(token) -> None:
    assert reason(Verifier({"text2html": KEY}), token) == "forged"


def test_a_credential_under_another_key_is_forged() -> None:
    assert reason(Verifier({"text2html": KEY}), issue(CLAIMS, OTHER_KEY)) == "forged"


def test_a_co_cannot_extend_its_credential() -> None:
    body, mac = issue(CLAIMS, KEY).split(".")
    doc = json.loads(unb64(body))
    doc["e"] += 3_600_000  # one more hour
    tampered = b64(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()) + "." + mac
    assert reason(Verifier({"text2html": KEY}), tampered) == "forged"


@given(st.data())
def test_any_single_character_changed_is_rejected(data) -> None:
    token = issue(CLAIMS, KEY)
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.sampled_from("ABCabc019-_.=").filter(lambda ch: ch != token[i]))
    changed = token[:i] + c + token[i + 1:]
    try:
        verified = Verifier({"text2html": KEY}).verify(changed, "text2html", NOW)
    except CredentialError:
        return
    # base64 ignores the unused low bits of a last character: the same bytes may decode.
    assert verified.lease_id == "lease-1" and verified.expires_at == NOW + 60


def test_expired() -> None:
    verifier = Verifier({"text2html": KEY})
    token = issue(CLAIMS, KEY)
    assert verifier.verify(token, "text2html", NOW + 59.999).lease_id == "lease-1"
    with pytest.raises(CredentialError) as err:
        verifier.verify(token, "text2html", NOW + 60)
    assert err.value.reason == "expired"


def test_leeway_tolerates_skew_only_as_far_as_told() -> None:
    verifier = Verifier({"text2html": KEY}, leeway_s=2.0)
    assert verifier.verify(issue(CLAIMS, KEY), "text2html", NOW + 61).lease_id == "lease-1"
    with pytest.raises(CredentialError):
        verifier.verify(issue(CLAIMS, KEY), "text2html", NOW + 62)


def test_revoked_until_it_would_have_expired_then_pruned() -> None:
    revocations = RevocationList()
    verifier = Verifier({"text2html": KEY}, revocations)
    token = issue(CLAIMS, KEY)
    revocations.revoke("lease-2", NOW + 10)  # another lease: no effect on this one
    assert verifier.verify(token, "text2html", NOW).lease_id == "lease-1"
    revocations.revoke("lease-1", NOW + 61)
    assert reason(verifier, token) == "revoked"
    assert revocations.prune(NOW + 30) == 1 and "lease-1" in revocations
    assert revocations.prune(NOW + 62) == 1 and len(revocations) == 0


def test_wrong_service_and_wrong_instance() -> None:
    token = issue(CLAIMS, KEY)
    both = Verifier({"text2html": KEY, "html2rtf": OTHER_KEY})
    assert reason(both, token, service="html2rtf") == "wrong_service"
    # an object that knows only its own key cannot tell; it refuses all the same
    assert reason(Verifier({"html2rtf": OTHER_KEY}), token, service="html2rtf") == "forged"
    assert reason(both, token, instance="t2h@r9") == "wrong_instance"


def test_revocations_travel_as_json() -> None:
    revocations = RevocationList()
    revocations.revoke("a", NOW + 1)
    revocations.revoke("b", NOW + 2)
    copy = RevocationList.from_dict(json.loads(json.dumps(revocations.as_dict())))
    assert copy.as_dict() == revocations.as_dict()
    assert copy.revoked("b", NOW + 2) and not copy.revoked("a", NOW + 1.5)


@pytest.mark.parametrize("doc", [None, {"revoked": "a"}, {"revoked": [{"lease_id": "a"}]},
                                 {"revoked": [{"lease_id": 1, "until": 5}]},
                                 {"revoked": [{"lease_id": "a", "until": "soon"}]},
                                 {"other": []}])
def test_revocations_from_the_wire_are_validated(doc) -> None:
    with pytest.raises(BadRequest):
        RevocationList.from_dict(doc)


def test_service_keys_are_per_service_and_rotate() -> None:
    keys = ServiceKeys()
    assert keys.key("a") == keys.key("a") != keys.key("b")
    assert len(keys.key("a")) == 32
    old = keys.key("a")
    token = issue(CLAIMS, old)
    assert keys.rotate("a") != old
    assert reason(Verifier({"text2html": keys.key("a")}), token) == "forged"


def test_derived_keys_are_per_service_and_need_no_exchange() -> None:
    """The broker and an instance's router derive the same key from the router key alone."""
    from agent.broker.credentials import ServiceKeys, derive_service_key

    master = bytes(range(32))
    keys = ServiceKeys.derived(master)
    assert keys.key("text2html") == derive_service_key(master, "text2html")
    assert keys.key("text2html") != keys.key("html2rtf")
    assert ServiceKeys.derived(bytes(32)).key("text2html") != keys.key("text2html")
    with pytest.raises(ValueError):
        keys.rotate("text2html")
    with pytest.raises(ValueError):
        ServiceKeys.derived(b"short")


def test_a_name_with_a_trailing_newline_is_not_a_name() -> None:
    """``$`` matches before a final newline: names are checked whole (issue 12)."""
    from agent.broker import wire
    from agent.broker.errors import BadRequest

    assert wire.check_name("r22a/vm1@ab", "instance") == "r22a/vm1@ab"
    with pytest.raises(BadRequest):
        wire.check_name("r22a/vm1\n", "instance")
