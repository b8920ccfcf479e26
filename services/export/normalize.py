"""Normalisation and hashing of customer information for the ad platforms (pure, no I/O).

Meta and Google normalise differently (PRODUCT.md): Meta keeps the dots of a gmail address and
sends phones as digits, Google removes them and wants E.164 with the plus. The anchors lose most
of their matches through un-normalised or twice-hashed values, so every rule lives here, once,
with the golden vectors in the tests.

A value that is already a SHA-256 hex digest (64 hex characters) is taken as hashed: it is
lower-cased and passed through, never hashed again.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

import phonenumbers

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NON_DIGITS = re.compile(r"\D+")
_US_ZIP = re.compile(r"^(\d{5})(?:-?\d{4})?$")
_PHONE_SEPARATORS = re.compile(r"[\s().\-/]+")
_INTERNATIONAL = re.compile(r"^\+[1-9]\d{7,14}$")


_COUNTRY_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def _known_country_code(digits: str) -> bool:
    """Whether the digits (no leading zero) start with a calling code phonenumbers knows."""
    codes = _COUNTRY_CODES
    return digits[:1] in codes or digits[:2] in codes or digits[:3] in codes


# Meta user_data keys that are sent as they are, never hashed.
META_NEVER_HASHED = frozenset({"client_ip_address", "client_user_agent", "fbc", "fbp", "madid"})
# Meta user_data keys that are hashed (after their normalisation).
META_HASHED = ("em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id")

COUNTRIES = frozenset(r.lower() for r in phonenumbers.SUPPORTED_REGIONS) | {
    "aq",
    "bv",
    "gs",
    "hm",
    "pn",
    "tf",
    "um",
}

US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "district of columbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi", "minnesota": "mn",
    "mississippi": "ms", "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
    "new hampshire": "nh", "new jersey": "nj", "new mexico": "nm", "new york": "ny",
    "north carolina": "nc", "north dakota": "nd", "ohio": "oh", "oklahoma": "ok", "oregon": "or",
    "pennsylvania": "pa", "rhode island": "ri", "south carolina": "sc", "south dakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va",
    "washington": "wa", "west virginia": "wv", "wisconsin": "wi", "wyoming": "wy",
    "puerto rico": "pr", "guam": "gu",
}  # fmt: skip

_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


class NormalisationError(ValueError):
    """A value that cannot be normalised: `reason` is a stable code, the message a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_hashed(value: str) -> bool:
    """True for a SHA-256 hex digest: such a value must never be hashed again."""
    # The length test first: most values are not 64 characters long, and it costs far less.
    return len(value) >= 64 and bool(_HEX64.match(value.strip()))


def sha256_hex(value: str) -> str:
    """SHA-256 of the UTF-8 bytes, lower-case hex; an already-hashed value is passed through."""
    if is_hashed(value):
        return value.strip().lower()
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


_ASCII_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def _letters_only(value: str) -> str:
    """Lower-case, NFC, without punctuation, symbols or spaces; letters of every script kept."""
    text = value.strip().lower()
    if text.isascii():
        return _ASCII_NOT_ALNUM.sub("", text)
    text = unicodedata.normalize("NFC", text)
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LMN")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- shared by both platforms ----------------------------------------------------------------


def email(value: str) -> str:
    """Trimmed, lower-cased email (Meta's rule, and the identity service's)."""
    out = value.strip().lower()
    if not _EMAIL.match(out):
        raise NormalisationError("INVALID_EMAIL", "is not an email address (name@domain.tld)")
    return out


def phone_e164(value: str, default_region: str = "US") -> str:
    """A phone number in E.164 (`+16505551212`).

    Numbers written with `+` or `00` are international; others are read in `default_region`,
    and when that gives no valid number, as international digits without the plus
    (`16505551212` stays the US number whatever the default region).
    """
    raw = value.strip()
    if raw.startswith("00"):
        raw = "+" + raw[2:]
    compact = _PHONE_SEPARATORS.sub("", raw)
    if "(0)" not in raw and _INTERNATIONAL.match(compact) and _known_country_code(compact[1:]):
        # Written with its country code in plain digits: already E.164 (parsing it with
        # phonenumbers costs ~100 µs and would not change it).
        return compact
    attempts = [(raw, None)] if raw.startswith("+") else [(raw, default_region.upper()), ("+" + raw, None)]
    possible: phonenumbers.PhoneNumber | None = None
    for text, region in attempts:
        try:
            num = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(num):
            return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        if possible is None and phonenumbers.is_possible_number(num):
            possible = num
    if possible is not None:
        # Not in the numbering plan's metadata (e.g. a new range) but of a possible length.
        return phonenumbers.format_number(possible, phonenumbers.PhoneNumberFormat.E164)
    raise NormalisationError("INVALID_PHONE", "is not a phone number (write it with its country code)")


def country(value: str) -> str:
    out = value.strip().lower()
    if out not in COUNTRIES:
        raise NormalisationError("INVALID_COUNTRY", "must be an ISO 3166-1 alpha-2 code, e.g. US")
    return out


# --- Meta ------------------------------------------------------------------------------------


def meta_phone(value: str, default_region: str = "US") -> str:
    """Digits only, with the country code (`16505551212`)."""
    return phone_e164(value, default_region)[1:]


def meta_name(value: str) -> str:
    out = _letters_only(value)
    if not out:
        raise NormalisationError("EMPTY_AFTER_NORMALISATION", "has no letters")
    return out


def meta_city(value: str) -> str:
    out = _letters_only(value)
    if not out:
        raise NormalisationError("EMPTY_AFTER_NORMALISATION", "has no letters")
    return out


def meta_state(value: str) -> str:
    """Two-letter lower-case code; US state names are mapped to their code."""
    text = " ".join(value.strip().lower().replace(".", "").split())
    text = US_STATES.get(text, text)
    if len(text) != 2 or not text.isalpha():
        raise NormalisationError("INVALID_STATE", "must be a 2-letter state or province code")
    return text


def meta_zip(value: str, country_code: str | None = None) -> str:
    """Lower-case without spaces or dashes; US zips keep their first 5 digits."""
    text = value.strip().lower()
    if country_code in (None, "us"):
        m = _US_ZIP.match(text.replace(" ", ""))
        if m:
            return m.group(1)
    out = text.replace(" ", "").replace("-", "")
    if not out or not out.isalnum():
        raise NormalisationError("INVALID_ZIP", "must be letters and digits only")
    return out


def meta_gender(value: str) -> str:
    text = value.strip().lower()
    if text in ("m", "male"):
        return "m"
    if text in ("f", "female"):
        return "f"
    raise NormalisationError("INVALID_GENDER", "must be m or f")


def meta_date_of_birth(value: str | date) -> str:
    """YYYYMMDD from a date or an ISO date string (YYYY-MM-DD or YYYYMMDD)."""
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    text = value.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%Y/%m/%d"):
        try:
            return datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise NormalisationError("INVALID_DATE_OF_BIRTH", "must be a date YYYY-MM-DD")


def external_id(value: str) -> str:
    out = value.strip()
    if not out:
        raise NormalisationError("EMPTY", "is empty")
    return out


# --- Google ----------------------------------------------------------------------------------


def google_email(value: str) -> str:
    """Trimmed, lower-cased; for gmail.com and googlemail.com also without dots and +suffix
    in the local part."""
    out = email(value)
    local, _, domain = out.partition("@")
    if domain in _GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        if not local:
            raise NormalisationError("INVALID_EMAIL", "has an empty local part")
        out = f"{local}@{domain}"
    return out


def google_phone(value: str, default_region: str = "US") -> str:
    return phone_e164(value, default_region)


# --- hashed sets -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contact:
    """What a buyer gave at the till, as received (all optional)."""

    email: str = ""
    phone: str = ""
    first_name: str = ""
    last_name: str = ""
    city: str = ""
    state: str = ""
    zip: str = ""
    country: str = ""
    external_id: str = ""
    gender: str = ""
    date_of_birth: str = ""


@dataclass(slots=True)
class Normalised:
    """A contact normalised for matching and hashed for each platform.

    `email`/`phone` are the plain values the identity service stores (trimmed lower-case email,
    E.164 phone) and are used for matching only; `meta` is Meta's hashed user_data; `google` holds
    Google's hashed email and phone. `problems` lists fields that were dropped: (field, reason,
    description).
    """

    email: str | None
    phone: str | None
    external_id: str | None
    meta: dict[str, str]
    google: dict[str, str]
    problems: list[tuple[str, str, str]]


def normalise_contact(c: Contact, default_region: str = "US") -> Normalised:
    """Normalises and hashes every field of a contact; a bad field is dropped and reported."""
    return normalise_values(
        c.email,
        c.phone,
        c.first_name,
        c.last_name,
        c.city,
        c.state,
        c.zip,
        c.country,
        c.external_id,
        c.gender,
        c.date_of_birth,
        default_region,
    )


# Normalised-and-hashed values of the fields that repeat from buyer to buyer (names, city, state,
# zip, country, gender, birth date): (Meta key, raw value, country) -> the hash, or the
# (reason, description) of why the value was dropped. Emails and phones are not kept (they are
# unique per buyer). Bounded: emptied when full.
_MEMO_MAX = 50_000
_memo: dict[tuple[str, str, str | None], str | tuple[str, str]] = {}

# Raw country (valid ones only) -> (ISO code, its hash): a few hundred values at most.
_countries: dict[str, tuple[str, str]] = {}

_PER_FIELD: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("first_name", "fn", meta_name),
    ("last_name", "ln", meta_name),
    ("city", "ct", meta_city),
    ("state", "st", meta_state),
    ("zip", "zp", meta_zip),
    ("gender", "ge", meta_gender),
    ("date_of_birth", "db", meta_date_of_birth),
)


def _hashed_field(field: str, fn: Callable[[str], str], raw: str) -> str | tuple[str, str]:
    """One repeating field, normalised by `fn` and hashed (or passed through when already a
    hash): the hash, or (reason, description) when it cannot be normalised."""
    if is_hashed(raw):
        return raw.strip().lower()
    try:
        return _sha(fn(raw))
    except NormalisationError as err:
        return (err.reason, f"{field} {err}")


def normalise_values(
    email_: str,
    phone: str,
    first_name: str,
    last_name: str,
    city: str,
    state: str,
    zip_: str,
    country_: str,
    external_id_: str,
    gender: str,
    date_of_birth: str,
    default_region: str = "US",
) -> Normalised:
    """`normalise_contact` for plain values (the intake path: no Contact object per row)."""
    problems: list[tuple[str, str, str]] = []
    meta: dict[str, str] = {}
    google: dict[str, str] = {}
    plain_email = plain_phone = ext = None
    memo = _memo

    if email_.strip():
        if is_hashed(email_):
            meta["em"] = email_.strip().lower()
        else:
            try:
                plain_email = email(email_)
            except NormalisationError as err:
                problems.append(("email", err.reason, f"email {err}"))
            else:
                meta["em"] = _sha(plain_email)
                g = google_email(plain_email)
                google["hashed_email"] = meta["em"] if g == plain_email else _sha(g)
    if phone.strip():
        if is_hashed(phone):
            meta["ph"] = phone.strip().lower()
        else:
            try:
                plain_phone = phone_e164(phone, default_region)
            except NormalisationError as err:
                problems.append(("phone", err.reason, f"phone {err}"))
            else:
                meta["ph"] = _sha(plain_phone[1:])
                google["hashed_phone_number"] = _sha(plain_phone)
    cc = None
    if country_.strip():
        if is_hashed(country_):
            meta["country"] = country_.strip().lower()
        else:
            hit = _countries.get(country_)
            if hit is None:
                try:
                    code = country(country_)
                except NormalisationError as err:
                    problems.append(("country", err.reason, f"country {err}"))
                else:
                    hit = (code, _sha(code))
                    if len(_countries) >= 1000:
                        _countries.clear()
                    _countries[country_] = hit
            if hit is not None:
                cc, meta["country"] = hit
    raws = (first_name, last_name, city, state, zip_, gender, date_of_birth)
    for (field, key, fn), raw in zip(_PER_FIELD, raws, strict=True):
        if not raw or not raw.strip():
            continue
        memo_key = (key, raw, cc if key == "zp" else None)
        out = memo.get(memo_key)
        if out is None:
            rule = fn if key != "zp" else (lambda v: meta_zip(v, cc))
            out = _hashed_field(field, rule, raw)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[memo_key] = out
        if isinstance(out, str):
            meta[key] = out
        else:
            reason, description = out
            problems.append((field, reason, description))
    if external_id_.strip():
        ext = external_id_.strip()
        meta["external_id"] = sha256_hex(ext)
    return Normalised(plain_email, plain_phone, ext, meta, google, problems)


def hash_meta_user_data(fields: dict[str, str], default_region: str = "US") -> dict[str, str]:
    """Meta user_data from plain values keyed by Meta's names: each hashed key normalised by its
    rule and hashed once; the never-hashed keys (ip, user agent, fbc, fbp, madid) kept as sent."""
    out: dict[str, str] = {}
    cc = fields.get("country", "").strip().lower() or None
    rules: dict[str, Callable[[str], str]] = {
        "em": email,
        "ph": lambda v: meta_phone(v, default_region),
        "fn": meta_name,
        "ln": meta_name,
        "ct": meta_city,
        "st": meta_state,
        "zp": lambda v: meta_zip(v, cc),
        "country": country,
        "ge": meta_gender,
        "db": meta_date_of_birth,
        "external_id": external_id,
    }
    for key, value in fields.items():
        if key in META_NEVER_HASHED:
            out[key] = value
        elif key in rules:
            out[key] = value.strip().lower() if is_hashed(value) else sha256_hex(rules[key](value))
        else:
            raise NormalisationError("UNKNOWN_FIELD", f"{key} is not a Meta user_data field")
    return out
