"""Normalisation and hashing for Meta and Google: PRODUCT.md's rules and golden vectors."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.export import normalize as n

# PRODUCT.md's golden vectors.
EMAIL_HASH = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
PHONE_HASH = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
MARY_HASH = "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_golden_vectors_after_normalisation() -> None:
    assert n.sha256_hex(n.email("  John_Smith@Gmail.com ")) == EMAIL_HASH
    assert n.sha256_hex(n.meta_phone("+1 (650) 555-1212")) == PHONE_HASH
    assert n.sha256_hex(n.meta_phone("16505551212")) == PHONE_HASH
    assert n.sha256_hex(n.meta_name(" Mary ")) == MARY_HASH
    user_data = n.hash_meta_user_data({"em": "JOHN_SMITH@gmail.com", "ph": "650-555-1212", "fn": "MARY"})
    assert user_data == {"em": EMAIL_HASH, "ph": PHONE_HASH, "fn": MARY_HASH}


def test_a_hashed_value_is_never_hashed_again() -> None:
    assert n.sha256_hex(EMAIL_HASH) == EMAIL_HASH
    assert n.sha256_hex(EMAIL_HASH.upper()) == EMAIL_HASH
    assert n.hash_meta_user_data({"em": EMAIL_HASH.upper(), "ph": PHONE_HASH}) == {
        "em": EMAIL_HASH,
        "ph": PHONE_HASH,
    }
    norm = n.normalise_contact(n.Contact(email=EMAIL_HASH, phone=PHONE_HASH, first_name=MARY_HASH))
    assert norm.meta == {"em": EMAIL_HASH, "ph": PHONE_HASH, "fn": MARY_HASH}
    assert norm.email is None  # a hash cannot be matched to a profile


def test_meta_never_hashes_ip_user_agent_fbc_fbp_madid() -> None:
    raw = {
        "client_ip_address": "203.0.113.9",
        "client_user_agent": "Mozilla/5.0",
        "fbc": "fb.1.1700000000000.AbCd",
        "fbp": "fb.1.1700000000000.123",
        "madid": "38400000-8cf0-11bd-b23e-10b96e40000d",
    }
    assert n.hash_meta_user_data(raw) == raw


@pytest.mark.parametrize(
    ("fn", "raw", "expected"),
    [
        (n.meta_name, "Mary-Ann O'Neil", "maryannoneil"),
        (n.meta_name, "  José ", "josé"),  # UTF-8 kept
        (n.meta_name, "Łukasz", "łukasz"),
        (n.meta_city, "San Francisco", "sanfrancisco"),
        (n.meta_city, "St. Louis", "stlouis"),
        (n.meta_state, "CA", "ca"),
        (n.meta_state, "California", "ca"),
        (n.meta_state, " n.y. ", "ny"),
        (n.meta_zip, "94035-1234", "94035"),
        (n.meta_zip, " 94035 ", "94035"),
        (n.country, " US ", "us"),
        (n.meta_gender, "Female", "f"),
        (n.meta_gender, "M", "m"),
        (n.meta_date_of_birth, "1997-02-14", "19970214"),
        (n.meta_date_of_birth, "19970214", "19970214"),
    ],
)
def test_meta_field_rules(fn: Any, raw: str, expected: str) -> None:
    assert fn(raw) == expected


def test_zip_outside_the_us_keeps_letters_without_spaces_or_dashes() -> None:
    assert n.meta_zip("SW1A 1AA", "gb") == "sw1a1aa"
    assert n.meta_zip("1010-AB", "nl") == "1010ab"


@pytest.mark.parametrize(
    ("fn", "raw", "reason"),
    [
        (n.email, "not-an-email", "INVALID_EMAIL"),
        (n.phone_e164, "12", "INVALID_PHONE"),
        (n.phone_e164, "call me", "INVALID_PHONE"),
        (n.country, "USA", "INVALID_COUNTRY"),
        (n.meta_state, "Atlantis", "INVALID_STATE"),
        (n.meta_gender, "x", "INVALID_GENDER"),
        (n.meta_date_of_birth, "14/02/1997", "INVALID_DATE_OF_BIRTH"),
        (n.meta_name, "--", "EMPTY_AFTER_NORMALISATION"),
    ],
)
def test_bad_values_raise_with_a_reason(fn: Any, raw: str, reason: str) -> None:
    with pytest.raises(n.NormalisationError) as err:
        fn(raw)
    assert err.value.reason == reason


def test_google_email_removes_dots_and_plus_suffix_only_for_gmail() -> None:
    assert n.google_email(" John.Smith+promo@Gmail.com ") == "johnsmith@gmail.com"
    assert n.google_email("j.o.h.n@googlemail.com") == "john@googlemail.com"
    assert n.google_email("John.Smith+promo@example.com") == "john.smith+promo@example.com"


def test_phones_in_e164_with_a_configurable_default_region() -> None:
    assert n.google_phone("(650) 555-1212") == "+16505551212"
    assert n.google_phone("16505551212", "GB") == "+16505551212"
    assert n.google_phone("020 7946 0958", "GB") == "+442079460958"
    assert n.google_phone("0044 20 7946 0958") == "+442079460958"
    assert n.google_phone("030 123456", "DE") == "+4930123456"


def test_contact_hashed_for_each_platform_with_their_own_rules() -> None:
    norm = n.normalise_contact(
        n.Contact(
            email=" John.Smith+x@Gmail.com",
            phone="(650) 555-1212",
            first_name="Mary",
            last_name="Smith-Jones",
            city="New York",
            state="New York",
            zip="10001-0001",
            country="US",
            external_id="cust-42",
        )
    )
    assert norm.problems == []
    assert norm.email == "john.smith+x@gmail.com"
    assert norm.phone == "+16505551212"
    assert norm.meta == {
        "em": sha("john.smith+x@gmail.com"),
        "ph": PHONE_HASH,
        "country": sha("us"),
        "fn": MARY_HASH,
        "ln": sha("smithjones"),
        "ct": sha("newyork"),
        "st": sha("ny"),
        "zp": sha("10001"),
        "external_id": sha("cust-42"),
    }
    assert norm.google == {
        "hashed_email": sha("johnsmith@gmail.com"),
        "hashed_phone_number": sha("+16505551212"),
    }


def test_a_bad_field_is_dropped_and_reported_not_the_contact() -> None:
    norm = n.normalise_contact(n.Contact(email="nope", phone="650 555 1212", country="Narnia"))
    assert [(f, r) for f, r, _ in norm.problems] == [
        ("email", "INVALID_EMAIL"),
        ("country", "INVALID_COUNTRY"),
    ]
    assert set(norm.meta) == {"ph"}
    assert norm.google == {"hashed_phone_number": sha("+16505551212")}


@given(st.text(max_size=40))
def test_hashing_is_idempotent(value: str) -> None:
    once = n.sha256_hex(value)
    assert len(once) == 64 and once == once.lower()
    assert n.sha256_hex(once) == once
