"""Pure identity stitching: the identifiers of an event, the rules of a space, and the
partition of identifiers into profiles. No I/O here: `apply()` and `settle()` say what to load
through a `GraphLoader` (the store, or the tests' memory store), `Graph` changes the slice it
holds, and the store writes the changes back.

The model
---------
* An identifier is (kind, value) within a space. It is *born* at the first event (in event-time
  order: timestamp, then message id, then source id) that carries it, as a profile of its own.
* A *link* is the set of identifiers of one event. Identical sets link identically, so a link
  is stored once per distinct set, with the key of its earliest event.
* Links are applied in key order by the greedy rule: the profiles of the link's identifiers are
  merged unless the result breaks a limit per kind; then the link's lowest-priority identifier
  is dropped and the merge retried. Identifiers left out stay where they are (a refusal is
  logged); one left out but born by this very event still joins when the limits allow (it brings
  no other profile with it). A profile is named after its oldest identifier (`profile_id`), so
  names are stable across merges and recomputation and do not depend on arrival order.
* A *component* is a connected set of identifiers (through links, refused ones included): the
  unit of recomputation. When an event arrives whose key is later than everything its component
  has seen, applying it is the greedy step itself (the fast path). When it is earlier (a late
  event), the component is recomputed from its links, sorted by key. Either way the partition is
  the one the greedy rule gives over all events in key order: it depends on the set of events,
  not on the order they arrived in.
* Splits are durable: a *detached* (isolated) identifier never links again; a *cut* link never
  links again. Both are applied by recomputing the component.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
import phonenumbers

# Junk values (empty, "0", "null", "undefined", "[object Object]", ...): the ingest service
# already refuses them as userId/anonymousId; identity refuses them as any identifier.
from services.ingest.domain import JUNK_IDS, is_junk_id

# (kind, value). Variable-length tuple types, for mypyc (scripts/build_native.py): it keeps a
# fixed-length tuple unboxed and would build a new tuple object each time one is a dict key.
Ident = tuple[str, ...]
# When an event happened, as the total order the rules are applied in: (timestamp, message_id,
# source_id), the timestamp a datetime or, from the consumer's raw-times pool, a (microseconds,).
Key = tuple[Any, ...]

DEFAULT_LIMIT = 5
DEFAULT_LIMITS: Mapping[str, int] = {"user_id": 1}
# Kinds ranked first, in this order, then custom kinds (alphabetically), then LOW_PRIORITY.
DEFAULT_PRIORITY = ("user_id", "email", "phone")
# Kinds shared by several people most often (a family browser, a shop's tablet): dropped first.
LOW_PRIORITY = ("anonymous_id", "advertising_id", "device_id", "push_token")
DEVICE_KINDS = frozenset(LOW_PRIORITY)
# context.device fields that are identifiers, and their kinds.
DEVICE_FIELDS = (("id", "device_id"), ("advertisingId", "advertising_id"), ("token", "push_token"))
KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_VALUE_CHARS = 512
PROFILE_ID_RE = re.compile(r"^p[0-9a-f]{20}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")

MERGED = "merged"
REFUSED = "refused"
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"


class Rules:
    """A space's stitching rules: a limit per kind, a priority order, blocked values."""

    __slots__ = ("_blocked", "_rank", "blocked_pattern", "default_limit", "limits", "priority")

    def __init__(
        self,
        limits: Mapping[str, int] | None = None,
        default_limit: int = DEFAULT_LIMIT,
        priority: Sequence[str] = DEFAULT_PRIORITY,
        blocked_pattern: str = "",
    ) -> None:
        limits = dict(DEFAULT_LIMITS if limits is None else limits)
        for kind, n in [*limits.items(), ("*", default_limit)]:
            if n < 1:
                raise ValueError(f"the limit of {kind} must be at least 1, got {n}")
        self.limits = limits
        self.default_limit = default_limit
        self.priority = tuple(priority)
        self.blocked_pattern = blocked_pattern
        self._blocked = re.compile(blocked_pattern) if blocked_pattern else None
        # (group, index, kind) per kind: tuple[Any, ...] keeps mypyc from unboxing each (a new
        # tuple object each time one is compared).
        self._rank: dict[str, tuple[Any, ...]] = {}

    def limit(self, kind: str) -> int:
        return self.limits.get(kind, self.default_limit)

    def rank(self, kind: str) -> tuple[Any, ...]:
        """Smaller is higher priority: the listed kinds, custom kinds, then LOW_PRIORITY."""
        r = self._rank.get(kind)
        if r is None:
            if kind in self.priority:
                r = (0, self.priority.index(kind), "")
            elif kind in LOW_PRIORITY:
                r = (2, LOW_PRIORITY.index(kind), "")
            else:
                r = (1, 0, kind)
            self._rank[kind] = r
        return r

    def order(self, ident: Ident) -> tuple[Any, ...]:
        r = self._rank.get(ident[0])
        return (self.rank(ident[0]) if r is None else r), ident[1]

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return self._blocked

    def is_blocked(self, value: str) -> bool:
        """Junk ids (is_junk_id's list, compared the same way) and the space's pattern."""
        return is_junk_id(value) or (self._blocked is not None and self._blocked.search(value) is not None)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, base: Rules) -> Rules:
        """A space's overrides (identity.space_rules) over the service's defaults."""
        if not config:
            return base
        limits = dict(base.limits)
        limits.update({str(k): int(v) for k, v in (config.get("limits") or {}).items()})
        return cls(
            limits,
            int(config.get("default_limit") or base.default_limit),
            tuple(config.get("priority") or base.priority),
            str(config.get("blocked_pattern") or base.blocked_pattern),
        )


def parse_limits(text: str) -> dict[str, int]:
    """'user_id=1,email=5' as a dict (settings)."""
    out: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, eq, n = part.partition("=")
        if not eq or not KIND_RE.match(kind.strip()) or not n.strip().isdigit():
            raise ValueError(f"a limit is kind=N, got {part!r}")
        out[kind.strip()] = int(n)
    return out


def profile_id(space_id: str, ident: Ident) -> str:
    """The id of the profile founded by `ident` (its oldest identifier)."""
    raw = f"{space_id}\x1f{ident[0]}\x1f{ident[1]}".encode()
    return "p" + hashlib.blake2b(raw, digest_size=10).hexdigest()


def ident_digest(space_id: str, ident: Ident) -> bytes:
    """A one-way digest of an identifier (deleted identifiers are remembered only this way)."""
    return hashlib.blake2b(f"{space_id}\x1f{ident[0]}\x1f{ident[1]}".encode(), digest_size=16).digest()


def set_key(idents: Sequence[Ident]) -> bytes:
    """The key of a link: a digest of its identifier set (given in priority order)."""
    return hashlib.blake2b("\x1e".join(f"{k}\x1f{v}" for k, v in idents).encode(), digest_size=16).digest()


def encode_ident(ident: Ident) -> str:
    return f"{ident[0]}:{ident[1]}"


def decode_ident(text: str) -> Ident:
    kind, _, value = text.partition(":")
    return kind, value


# ---------------------------------------------------------------------------------------------
# Identifiers of an event


def normalise(kind: str, value: Any, region: str) -> str | None:
    """The identifier's canonical value, or None when it cannot be one."""
    if type(value) is not str:
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        value = str(value)
    text = value.strip()
    # Control characters are no part of a real id (and the store uses \x1e as a separator).
    if not text or len(text) > MAX_VALUE_CHARS or not text.isprintable():
        return None
    if kind == "email":
        text = text.lower()
        return text if _EMAIL_RE.match(text) else None
    if kind == "phone":
        try:
            number = phonenumbers.parse(text, region or None)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_valid_number(number):
            return None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return text


def normalise_kind(kind: Any) -> str | None:
    if not isinstance(kind, str):
        return None
    k = kind.strip().lower()
    return k if KIND_RE.match(k) else None


class Observed:
    """What identity takes from one event.

    This and the other value classes of the hot path are plain classes, not dataclasses: mypyc
    compiles their __init__ and attributes, where a dataclass keeps an interpreted __init__."""

    __slots__ = ("blocked", "device", "idents", "key", "space_id", "traits")

    def __init__(
        self,
        space_id: str,
        key: Key,
        idents: tuple[Ident, ...],
        blocked: tuple[Ident, ...] = (),
        traits: dict[str, Any] | None = None,
        device: dict[str, str] | None = None,
    ) -> None:
        self.space_id = space_id
        self.key = key
        # Usable identifiers, in priority order (the first one is the event's anchor: its events
        # are listed under the profile of that identifier).
        self.idents = idents
        # Values that would have been identifiers but are junk or match the blocked pattern.
        self.blocked = blocked
        # Traits set by the event (traits, then context.traits for keys traits lacks).
        self.traits: dict[str, Any] = {} if traits is None else traits
        # What the event says about its device or browser (context.device, os, userAgent).
        self.device: dict[str, str] = {} if device is None else device

    def fields(self) -> tuple[Any, ...]:
        return (self.space_id, self.key, self.idents, self.blocked, self.traits, self.device)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Observed) and self.fields() == other.fields()

    def __repr__(self) -> str:
        return f"Observed{self.fields()!r}"

    @property
    def time(self) -> datetime:
        return self.key[0]

    @property
    def message_id(self) -> str:
        return self.key[1]

    @property
    def source_id(self) -> str:
        return self.key[2]


@dataclass(frozen=True)
class Extractor:
    """Reads identifiers from events: the built-in kinds, context.externalIds, and the
    configured trait keys (each becomes a kind of its own)."""

    default_region: str = "US"
    trait_keys: tuple[str, ...] = ()

    def identifiers(
        self,
        rules: Rules,
        *,
        user_id: str | None,
        anonymous_id: str | None,
        previous_id: str | None,
        traits: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
    ) -> tuple[list[Ident], list[Ident]]:
        """(usable identifiers in priority order, blocked ones)."""
        ctx = context or {}
        return self.identifiers_of(
            rules,
            user_id,
            anonymous_id,
            previous_id,
            traits,
            ctx.get("traits"),
            ctx.get("device"),
            ctx.get("externalIds"),
        )

    def identifiers_of(
        self,
        rules: Rules,
        user_id: str | None,
        anonymous_id: str | None,
        previous_id: str | None,
        traits: Any,
        ctx_traits: Any,
        device: Any,
        external: Any,
    ) -> tuple[list[Ident], list[Ident]]:
        """`identifiers` from the members of the context it reads (context.traits, .device,
        .externalIds), each as found there (any JSON value, None when absent)."""
        region = self.default_region
        usable: dict[Ident, None] = {}
        bad: dict[Ident, None] = {}
        if user_id:
            _take(usable, bad, rules, "user_id", user_id, region)
        if anonymous_id:
            _take(usable, bad, rules, "anonymous_id", anonymous_id, region)
        if previous_id:
            # alias: the previous id is taken as the anonymousId the user had before (the
            # common case). A previous *userId* cannot merge anyway: one user_id per profile.
            _take(usable, bad, rules, "anonymous_id", previous_id, region)
        for t in (
            traits if isinstance(traits, dict) else None,
            ctx_traits if isinstance(ctx_traits, dict) else None,
        ):
            if not t:
                continue
            if "email" in t:
                _take(usable, bad, rules, "email", t["email"], region)
            if "phone" in t:
                _take(usable, bad, rules, "phone", t["phone"], region)
            for key in self.trait_keys:
                if key in t:
                    _take(usable, bad, rules, key, t[key], region)
        if isinstance(device, dict):
            for key, kind in DEVICE_FIELDS:
                if key in device:
                    _take(usable, bad, rules, kind, device[key], region)
        if isinstance(external, list):
            for item in external:
                if isinstance(item, dict):
                    ext = normalise_kind(item.get("type"))
                    if ext is not None:
                        _take(usable, bad, rules, ext, item.get("id"), region)
        out = list(usable) if len(usable) < 2 else sorted(usable, key=rules.order)
        if not bad:
            return out, []
        return out, sorted((x for x in bad if x not in usable), key=rules.order)

    def observe(self, ev: Any, rules: Rules) -> Observed | None:
        """The identity-relevant part of a LogEvent; None when it carries no usable identifier."""
        ctx = ev.context if isinstance(ev.context, dict) else {}
        ua = ctx.get("userAgent")
        return self.observe_fields(
            rules,
            ev.space_id,
            ev.source_id,
            ev.message_id,
            ev.user_id,
            ev.anonymous_id,
            ev.previous_id,
            ev.timestamp,
            ev.traits,
            ctx.get("traits"),
            ctx.get("device"),
            ctx.get("externalIds"),
            ctx.get("os"),
            ua if isinstance(ua, str) else None,
        )

    def observe_fields(
        self,
        rules: Rules,
        space_id: str,
        source_id: str,
        message_id: str,
        user_id: str | None,
        anonymous_id: str | None,
        previous_id: str | None,
        timestamp: Any,
        traits: Any,
        ctx_traits: Any,
        device: Any,
        external: Any,
        os_: Any,
        user_agent: str | None,
    ) -> Observed | None:
        """`observe` for the columns of a log row (the consumer reads only these: LOG_COLUMNS):
        of the context, the members identity reads, as found there (None when absent)."""
        traits = traits if isinstance(traits, dict) else {}
        usable, blocked = self.identifiers_of(
            rules, user_id, anonymous_id, previous_id, traits, ctx_traits, device, external
        )
        if not usable:
            return None
        merged_traits = {**ctx_traits, **traits} if isinstance(ctx_traits, dict) and ctx_traits else traits
        has_device = device is not None or os_ is not None or user_agent is not None
        return Observed(
            space_id,
            (timestamp, message_id, source_id),
            tuple(usable),
            tuple(blocked),
            merged_traits,
            device_attrs(device, os_, user_agent) if has_device else {},
        )


# The columns of the event log the consumer reads, in `observe_fields`' order (after xid, seq).
# Of the context only the members identity reads: a browser's or an app's context is a
# kilobyte or more of JSON (page, campaign, screen, library...) that Postgres would turn into
# text, send, and the consumer decode, for every event; these are a few bytes, mostly null.
# userAgent only when it is a string (what device_attrs takes), as text: no JSON to decode.
LOG_COLUMNS = """e.space_id, e.source_id, e.message_id, e.user_id, e.anonymous_id, e.previous_id,
    e."timestamp", e.traits, e.context->'traits', e.context->'device', e.context->'externalIds',
    e.context->'os',
    case when jsonb_typeof(e.context->'userAgent') = 'string' then e.context->>'userAgent' end"""


def observe_row(extractor: Extractor, rules: Rules, row: Any) -> Observed | None:
    """`Extractor.observe_fields` for a row of the consumer's read of the log (xid, seq, then
    LOG_COLUMNS), its columns passed one by one: a compiled call, where a star-call builds a
    list and a tuple and parses 14 arguments for each event."""
    return extractor.observe_fields(
        rules, row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11],
        row[12], row[13], row[14]
    )  # fmt: skip


def _take(
    usable: dict[Ident, None], bad: dict[Ident, None], rules: Rules, kind: str, value: Any, region: str
) -> None:
    if type(value) is str and kind not in _NORMALISED:
        # The common case (user, anonymous and device ids) without normalise()'s dispatch, and
        # with rules.is_blocked written out (the value is stripped already).
        text = value.strip()
        if text and len(text) <= MAX_VALUE_CHARS and text.isprintable():
            pattern = rules._blocked
            if text.lower() in JUNK_IDS or (pattern is not None and pattern.search(text) is not None):
                bad[(kind, text)] = None
            else:
                usable[(kind, text)] = None
        elif text:
            bad[(kind, text)] = None
        return
    norm = normalise(kind, value, region)
    if norm is None:
        if isinstance(value, str) and value.strip():
            bad[(kind, value.strip())] = None
    elif rules.is_blocked(norm):
        bad[(kind, norm)] = None
    else:
        usable[(kind, norm)] = None


_NORMALISED = frozenset({"email", "phone"})


def device_attrs(device: Any, os_: Any, ua: Any) -> dict[str, str]:
    """What context.device, context.os and context.userAgent say about the device or browser."""
    out: dict[str, str] = {}
    if isinstance(device, dict):
        for key in ("type", "manufacturer", "model"):
            v = device.get(key)
            if isinstance(v, str) and v:
                out[key] = v[:200]
    if isinstance(os_, dict):
        for key, name in (("name", "os_name"), ("version", "os_version")):
            v = os_.get(key)
            if isinstance(v, str) and v:
                out[name] = v[:200]
    if isinstance(ua, str) and ua:
        out["user_agent"] = ua[:500]
    return out


# ---------------------------------------------------------------------------------------------
# Decisions of the merge log


class Decision:
    """One entry of the merge log, as the rules made it. Equal decisions are the same entry:
    a recomputation keeps those it makes again and supersedes the others. Not to be changed."""

    __slots__ = ("action", "idents", "key", "limit_kind", "others", "profile", "reason")

    def __init__(
        self,
        action: str,  # MERGED or REFUSED
        reason: str,
        limit_kind: str,
        profile: str,
        others: tuple[str, ...],
        idents: tuple[Ident, ...],
        key: Key,
    ) -> None:
        self.action = action
        self.reason = reason
        self.limit_kind = limit_kind
        self.profile = profile
        self.others = others
        self.idents = idents
        self.key = key

    def fields(self) -> tuple[Any, ...]:
        return (self.action, self.reason, self.limit_kind, self.profile, self.others, self.idents, self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(self.fields())

    def __repr__(self) -> str:
        return f"Decision{self.fields()!r}"


# ---------------------------------------------------------------------------------------------
# The partition and the greedy rule


class Node:
    """One identifier of a graph slice: everything the rules and the write plan read of it, in
    one record. The graph's identifiers were once an entry in a dict per field, keyed by (kind,
    value) tuples; every read hashed a tuple and missed the cache somewhere else in memory
    (`python -m bench.layout`: the write plan's loop 4-5x slower that way).

    Its profile is an index into its Partition's list, not a reference: a profile holds its
    members, and a reference back would make each pair a cycle that only the cyclic collector
    frees. The consumer keeps that collector off during batches (stitcher._no_cyclic_gc) and
    lets reference counting free each batch's objects."""

    __slots__ = ("attrs", "birth", "changed", "comp", "ident", "kind", "last", "new", "p", "value")

    def __init__(self, ident: Ident, birth: Key, p: int, new: bool) -> None:
        self.ident = ident
        self.kind: str = ident[0]
        self.value: str = ident[1]
        self.birth = birth
        self.p = p  # its profile: Partition.plist[p]
        # Its component (as loaded or set: an alias of the root until the write), None alone.
        self.comp: int | None = None
        # Created by this graph (no row yet), and changed since loaded (its row is written).
        self.new = new
        self.changed = new
        # When the batch last saw it, and the device details of that event, if any.
        self.last: Any = None
        self.attrs: dict[str, str] | None = None


class Profile:
    """One profile of a graph slice: its members and what every merge decision reads of them,
    its founding member's (birth, rank, value) and its identifiers per kind (None: to count
    again, the members or their births changed). A new identifier's own profile is named only
    when its name is read (most are merged into another one by the very event that made them:
    a name, a blake2b digest, would be made for nothing)."""

    __slots__ = ("_founder", "_pid", "_space", "counts", "founded", "index", "members")

    def __init__(self, index: int, pid: str | None, space_id: str = "", founder: Ident | None = None) -> None:
        self.index = index  # in its Partition's plist
        self._pid = pid
        self._space = space_id
        self._founder = founder
        self.members: set[Node] = set()
        self.founded: tuple[Any, ...] | None = None
        self.counts: dict[str, int] = {}

    @property
    def pid(self) -> str:
        pid = self._pid
        if pid is None:
            assert self._founder is not None
            pid = profile_id(self._space, self._founder)
            self._pid = pid
        return pid


def _founded(p: Profile) -> tuple[Any, ...]:
    f = p.founded
    assert f is not None
    return f


class Partition:
    """Identifiers -> profiles, with the births that name profiles and settle merges."""

    __slots__ = ("nodes", "plist", "profiles", "rules", "space_id")

    def __init__(self, space_id: str, rules: Rules) -> None:
        self.space_id = space_id
        self.rules = rules
        self.nodes: dict[Ident, Node] = {}
        # Every profile made in this slice, by index (Node.p); merged-away ones stay, empty.
        self.plist: list[Profile] = []
        # Profiles by name, those loaded or made by a recomputation: what a loaded identifier
        # joins. A new identifier's own profile is not in it (no stored row can name it).
        self.profiles: dict[str, Profile] = {}

    def profile(self, n: Node) -> Profile:
        return self.plist[n.p]

    def _new_profile(self, pid: str | None, founder: Ident | None = None) -> Profile:
        p = Profile(len(self.plist), pid, self.space_id, founder)
        self.plist.append(p)
        if pid is not None:
            self.profiles[pid] = p
        return p

    def named(self, pid: str) -> Profile:
        """The profile of that name, made (empty) when the slice has none."""
        p = self.profiles.get(pid)
        return self._new_profile(pid) if p is None else p

    def _drop(self, p: Profile) -> None:
        """Forgets an emptied or absorbed profile."""
        pid = p._pid
        if pid is not None and self.profiles.get(pid) is p:
            del self.profiles[pid]

    def summarise(self, p: Profile) -> tuple[Any, ...]:
        """The profile's `founded`, counting its members when they changed."""
        f = p.founded
        if f is None:
            rank = self.rules.rank
            counts: dict[str, int] = {}
            for m in p.members:
                k = m.kind
                counts[k] = counts.get(k, 0) + 1
                g = (m.birth, rank(k), m.value)
                if f is None or g < f:
                    f = g
            assert f is not None  # a profile has members
            p.founded = f
            p.counts = counts
        return f

    def add(self, x: Ident, pid: str, birth: Key) -> Node:
        """A loaded identifier (no change)."""
        p = self.named(pid)
        p.founded = None
        n = Node(x, birth, p.index, False)
        p.members.add(n)
        self.nodes[x] = n
        return n

    def singleton(self, x: Ident, birth: Key) -> Node:
        """A new identifier, as a profile of its own."""
        p = self._new_profile(None, x)
        n = Node(x, birth, p.index, True)
        p.members.add(n)
        p.founded = (birth, self.rules.rank(n.kind), n.value)
        p.counts = {n.kind: 1}
        self.nodes[x] = n
        return n

    def alone(self, fresh: list[Node], birth: Key) -> None:
        """New nodes (Node.p -1), each as a profile of its own (what `singleton` makes)."""
        rank = self.rules.rank
        for n in fresh:
            if n.p < 0:
                p = self._new_profile(None, n.ident)
                n.p = p.index
                p.members.add(n)
                p.founded = (birth, rank(n.kind), n.value)
                p.counts = {n.kind: 1}

    def join(self, link: Sequence[Node], fresh: list[Node], key: Key) -> bool:
        """What `step` does for a link whose identifiers were all new but those of one existing
        profile (or none), born before this event, when no limit is exceeded: every new one
        joins that profile (or they make one together). No merge decision: singletons born by
        this very event are not profiles that existed. False (nothing done) otherwise."""
        target: Profile | None = None
        plist = self.plist
        left = len(fresh)
        for n in link:
            i = n.p
            if i < 0:
                left -= 1
                continue
            p = plist[i]
            if target is None:
                target = p
            elif p is not target:
                return False
        if left:
            return False  # a new identifier the link leaves out (blocked): `alone` for it
        rules = self.rules
        limits, default = rules.limits, rules.default_limit
        if target is None:
            counts: dict[str, int] = {}
        else:
            f = self.summarise(target)
            if not f[0] < key:
                return False
            counts = dict(target.counts)
        for n in fresh:
            k = n.kind
            c = counts.get(k, 0) + 1
            if c > limits.get(k, default):
                return False
            counts[k] = c
        if target is None:
            rank = rules.rank
            firsts = sorted([(rank(m.kind), m.value, i) for i, m in enumerate(fresh)])
            if len(firsts) > 1 and firsts[0][:2] == firsts[1][:2]:
                return False  # two as old as each other: `step` decides
            founder = fresh[firsts[0][2]]
            target = self._new_profile(None, founder.ident)
            target.founded = (key, firsts[0][0], founder.value)
        ti = target.index
        into = target.members
        for n in fresh:
            n.p = ti
            into.add(n)
        target.counts = counts
        return True

    def _move(self, n: Node, to: Profile) -> None:
        old = self.plist[n.p]
        old.members.discard(n)
        old.founded = None
        if not old.members:
            self._drop(old)
        n.p = to.index
        to.members.add(n)
        to.founded = None
        n.changed = True

    def step(self, link: Sequence[Node], key: Key) -> list[Decision]:
        """Applies one link (identifiers in priority order, all born) by the greedy rule."""
        first = link[0].p
        for n in link:
            if n.p != first:
                break
        else:
            return []  # already one profile: nothing to merge
        rules = self.rules
        limits, default = rules.limits, rules.default_limit
        summarise = self.summarise
        plist = self.plist
        kept = list(link)
        pids = {n.p for n in kept}
        dropped: list[Node] = []
        limit_kind = ""
        while True:
            counts: dict[str, int] = {}
            for i in pids:
                p = plist[i]
                summarise(p)
                for k, c in p.counts.items():
                    counts[k] = counts.get(k, 0) + c
            bad = [k for k, c in counts.items() if c > limits.get(k, default)]
            if not bad:
                break
            if not limit_kind:
                limit_kind = min(bad, key=rules.rank)
            # A single identifier's own profile keeps the limits, so `kept` never empties.
            dropped.append(kept.pop())
            pids = {n.p for n in kept}
        dropped.reverse()
        decisions: list[Decision] = []
        if len(pids) > 1:
            # A profile is named after its oldest identifier: the one with the oldest wins.
            target = plist[first]
            oldest: tuple[Any, ...] | None = None
            for i in pids:
                p = plist[i]
                f = _founded(p)
                if oldest is None or f < oldest:
                    target, oldest = p, f
            into = target.members
            ti = target.index
            for i in pids:
                if i != ti:
                    p = plist[i]
                    self._drop(p)
                    for m in p.members:
                        m.p = ti
                        m.changed = True
                        into.add(m)
                    p.members = set()
            target.counts = counts  # its `founded` is the oldest of them all: unchanged
            if _founded(target)[0] < key:
                existing = sorted(plist[i].pid for i in pids if i != ti and _founded(plist[i])[0] < key)
                if existing:
                    idents = tuple(n.ident for n in kept)
                    decisions.append(Decision(MERGED, "", "", target.pid, tuple(existing), idents, key))
        else:
            target = plist[next(iter(pids))]
        if dropped:
            summarise(target)
            counts = dict(target.counts)
            ti = target.index
            for n in dropped:
                # Born by this very event and still alone: it brings no other profile along,
                # so it joins unless its own kind is full.
                alone = n.birth == key and len(plist[n.p].members) == 1
                if alone and counts.get(n.kind, 0) < limits.get(n.kind, default):
                    self._move(n, target)
                    counts[n.kind] = counts.get(n.kind, 0) + 1
            refused = [n for n in dropped if n.p != ti]
            if refused:
                others = tuple(sorted({plist[n.p].pid for n in refused}))
                idents = tuple(n.ident for n in refused)
                decisions.append(
                    Decision(REFUSED, LIMIT_EXCEEDED, limit_kind, target.pid, others, idents, key)
                )
        return decisions


# ---------------------------------------------------------------------------------------------
# The graph slice the consumer works on


class LinkState:
    __slots__ = ("component", "cut", "first", "idents")

    def __init__(
        self, idents: tuple[Ident, ...], first: Key, cut: bool = False, component: int | None = None
    ) -> None:
        self.idents = idents
        self.first = first
        self.cut = cut
        self.component = component

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinkState) and (self.idents, self.first, self.cut, self.component) == (
            other.idents,
            other.first,
            other.cut,
            other.component,
        )

    def __repr__(self) -> str:
        return f"LinkState{(self.idents, self.first, self.cut, self.component)!r}"


class ComponentState:
    __slots__ = ("max_key", "size")

    def __init__(self, max_key: Key | None, size: int) -> None:
        self.max_key = max_key
        self.size = size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComponentState) and (self.max_key, self.size) == (other.max_key, other.size)

    def __repr__(self) -> str:
        return f"ComponentState{(self.max_key, self.size)!r}"


_EPOCH_US = 1_577_836_800_000_000  # 2020-01-01
_last_component_id = 0


def new_component_id() -> int:
    """A fresh component id without a round trip: microseconds since 2020 in the high bits,
    random low bits (replicas), increasing within the process. Ids that grow with time put
    each batch's new index entries (identifiers, links and components by component id) at the
    right edge of their indexes, where an insert costs a fraction of one at a random place.
    A collision fails the batch's insert, which is retried with fresh ids."""
    global _last_component_id
    cid = max(_last_component_id + 1, (time.time_ns() // 1000 - _EPOCH_US) << 12 | random.getrandbits(12))
    _last_component_id = cid
    return cid


class Graph:
    """The part of one space's identity graph that a batch (or a split) touches, with the
    changes made to it. The store fills it with `load_*` and writes back what changed."""

    def __init__(
        self, space_id: str, rules: Rules, new_component_id: Callable[[], int] = new_component_id
    ) -> None:
        self.space_id = space_id
        self.rules = rules
        self.part = Partition(space_id, rules)
        # Detached identifiers (rare: a set beside the nodes, so that `effective` costs nothing
        # while it is empty).
        self.isolated: set[Ident] = set()
        self.links: dict[bytes, LinkState] = {}
        self.components: dict[int, ComponentState] = {}
        self.alias: dict[int, int] = {}
        self.dirty: set[int] = set()
        self.new_component_id = new_component_id
        # Changes (an identifier's own are its node's `changed` and `new`).
        self.created = 0  # identifiers created
        self.changed_links: set[bytes] = set()
        # Links this graph created (no row yet: the store inserts them without looking for
        # one; every writer holds the consumer's lock, so none can appear meanwhile).
        self.new_links: set[bytes] = set()
        self.changed_components: set[int] = set()
        self.new_components: set[int] = set()
        self.removed_components: set[int] = set()
        self.decisions: list[Decision] = []
        # The merge log ids reserved for `decisions` once they are final (`number`), so that
        # the next batch, prepared while these are still being written, can supersede them.
        self.decision_ids: list[int] = []
        # Merge log entries (by their decision) recorded before; id of each.
        self.recorded: dict[Decision, int] = {}
        self.superseded: list[int] = []
        # Keys a link had before an earlier event of the same set arrived.
        self.replaced_keys: set[Key] = set()
        # Identifiers and links deleted (DeleteProfile).
        self.removed_idents: set[Ident] = set()
        self.removed_links: set[bytes] = set()
        # Components recomputed (a metric).
        self.recomputed = 0

    # -- loading --------------------------------------------------------------------------
    def load_ident(self, x: Ident, pid: str, component: int | None, birth: Key, isolated: bool) -> None:
        if x in self.part.nodes or x in self.removed_idents:
            return
        self.part.add(x, pid, birth).comp = component
        if isolated:
            self.isolated.add(x)

    def load_component(self, cid: int, max_key: Key | None, size: int) -> None:
        if cid not in self.components and cid not in self.alias and cid not in self.removed_components:
            self.components[cid] = ComponentState(max_key, size)

    def load_link(
        self, sk: bytes, idents: tuple[Ident, ...], first: Key, cut: bool, component: int | None
    ) -> None:
        if sk not in self.links and sk not in self.removed_links:
            self.links[sk] = LinkState(idents, first, cut, component)

    def number(self, ids: Sequence[int]) -> None:
        """Gives the graph's new decisions their merge log ids (reserved from the log's
        sequence), before its write: one per decision, in order."""
        if len(ids) != len(self.decisions):
            raise ValueError(f"{len(ids)} merge log ids for {len(self.decisions)} decisions")
        self.decision_ids = list(ids)

    # -- reading --------------------------------------------------------------------------
    def has(self, x: Ident) -> bool:
        return x in self.part.nodes

    def profile_of(self, x: Ident) -> str:
        part = self.part
        return part.plist[part.nodes[x].p].pid

    def birth_of(self, x: Ident) -> Key:
        return self.part.nodes[x].birth

    def find(self, cid: int) -> int:
        alias = self.alias
        while cid in alias:
            cid = alias[cid]
        return cid

    def root_of(self, x: Ident) -> int | None:
        n = self.part.nodes.get(x)
        c = None if n is None else n.comp
        return None if c is None else self.find(c)

    def _in(self, link: LinkState, root: int) -> bool:
        return link.component is not None and self.find(link.component) == root

    def effective(self, link: LinkState) -> tuple[Ident, ...]:
        """The identifiers a link still links (none when cut; detached and blocked ones left out)."""
        if link.cut:
            return ()
        iso = self.isolated
        pattern = self.rules.pattern
        if not iso and pattern is None:
            return link.idents  # junk never made it into a link
        return tuple(
            x for x in link.idents if x not in iso and (pattern is None or pattern.search(x[1]) is None)
        )

    def origins(self, root: int) -> list[int]:
        """Every known component id that now belongs to `root` (what the store loads)."""
        return [c for c in [*self.components, *self.alias] if self.find(c) == root]

    def owners(self, roots: set[int]) -> dict[int, int]:
        """Every known component id that now belongs to one of `roots`, and that root: one pass
        over the merged ids, so that a pass over the nodes or links asks a dict, not find()."""
        out = {r: r for r in roots}
        find = self.find
        for c in self.alias:
            r = find(c)
            if r in out:
                out[c] = r
        return out

    def changed_identifiers(self) -> set[Ident]:
        """Every identifier whose row must be written (new, moved, re-born, relabelled...)."""
        return {x for x, n in self.part.nodes.items() if n.changed}

    def _union(self, roots: set[int], alone: Sequence[Node]) -> int:
        if len(roots) == 1:
            survivor = next(iter(roots))
        elif roots:
            survivor = max(roots, key=lambda r: (self.components[r].size, -r))
        else:
            survivor = self.new_component_id()
            self.components[survivor] = ComponentState(None, 0)
            self.new_components.add(survivor)
        s = self.components[survivor]
        for r in roots:
            if r == survivor:
                continue
            c = self.components.pop(r)
            self.alias[r] = survivor
            self.removed_components.add(r)
            s.size += c.size
            if c.max_key is not None and (s.max_key is None or c.max_key > s.max_key):
                s.max_key = c.max_key
            if r in self.dirty:
                self.dirty.discard(r)
                self.dirty.add(survivor)
        for n in alone:
            n.comp = survivor
            n.changed = True
            s.size += 1
        self.changed_components.add(survivor)
        return survivor

    # -- applying events ------------------------------------------------------------------
    def observe(
        self, idents: Sequence[Ident], key: Key, sk: bytes | None = None, device: dict[str, str] | None = None
    ) -> None:
        """Applies one event's identifiers (in priority order). Late events mark their
        component dirty; `settle()` recomputes dirty components after a batch. `device`: what
        the event says of its device, kept with its device identifiers when it is their latest."""
        part = self.part
        nodes = part.nodes
        t = key[0]
        ns: list[Node] = []
        # New identifiers get no profile of their own yet (Node.p -1): most join the one existing
        # profile of the event's other identifiers, or one new profile together (`Partition.join`):
        # the Profile, set, dict and tuple of a singleton merged away at once are not made.
        fresh: list[Node] | None = None
        for x in idents:
            n = nodes.get(x)
            if n is None:
                n = Node(x, key, -1, True)
                nodes[x] = n
                self.created += 1
                if fresh is None:
                    fresh = [n]
                else:
                    fresh.append(n)
            elif key < n.birth:
                n.birth = key
                part.plist[n.p].founded = None
                n.changed = True
                if n.comp is not None:
                    self.dirty.add(self.find(n.comp))
            lt = n.last
            if lt is None or t >= lt:
                n.last = t
                if device and n.kind in DEVICE_KINDS:
                    n.attrs = device
            ns.append(n)
        if len(ns) < 2:
            if fresh is not None:
                part.alone(fresh, key)
            return
        sk = sk or set_key(idents)
        link = self.links.get(sk)
        if link is not None:
            if fresh is not None:
                part.alone(fresh, key)
            if link.first <= key:
                return  # the same set linked before: nothing changes
            self.replaced_keys.add(link.first)
            link.first = key
            self.changed_links.add(sk)
            if link.component is not None:
                self.dirty.add(self.find(link.component))
            return
        link = LinkState(tuple(idents), key)
        self.links[sk] = link
        self.changed_links.add(sk)
        self.new_links.add(sk)
        if self.isolated or self.rules._blocked is not None:
            ns = [nodes[x] for x in self.effective(link)]
            if len(ns) < 2:
                if fresh is not None:
                    part.alone(fresh, key)
                return
        alias, components, dirty = self.alias, self.components, self.dirty
        roots: set[int] = set()
        alone: list[Node] = []
        late = False
        for n in ns:
            c = n.comp
            if c is None:
                alone.append(n)
                continue
            while c in alias:
                c = alias[c]
            if c not in roots:
                roots.add(c)
                if not late and (c in dirty or (m := components[c].max_key) is None or key < m):
                    late = True
        root = self._union(roots, alone)
        link.component = root
        if late:
            if fresh is not None:
                part.alone(fresh, key)
            dirty.add(root)
            return
        components[root].max_key = key
        if fresh is not None and part.join(ns, fresh, key):
            return
        if fresh is not None:
            part.alone(fresh, key)
        decisions = part.step(ns, key)
        if decisions:
            self.decisions.extend(decisions)

    # -- recomputation --------------------------------------------------------------------
    def members_of(self, roots: set[int]) -> dict[int, tuple[list[Ident], list[tuple[bytes, LinkState]]]]:
        """The identifiers and links of each of these components, in one pass over the graph."""
        out: dict[int, tuple[list[Ident], list[tuple[bytes, LinkState]]]] = {r: ([], []) for r in roots}
        of = {c: out[r] for c, r in self.owners(roots).items()}
        for x, n in self.part.nodes.items():
            c = n.comp
            if c is not None and (hit := of.get(c)) is not None:
                hit[0].append(x)
        for sk, ln in self.links.items():
            c = ln.component
            if c is not None and (hit := of.get(c)) is not None:
                hit[1].append((sk, ln))
        return out

    def recompute(
        self,
        root: int,
        members: tuple[list[Ident], list[tuple[bytes, LinkState]]] | None = None,
    ) -> None:
        """Recomputes one component from its links in key order, splits it where it fell
        apart, and diffs the merge log against what was recorded. Every identifier and link
        of the component must be loaded. `members`: the component's (members_of), when known."""
        self.dirty.discard(root)
        self.recomputed += 1
        idents, links = members if members is not None else self.members_of({root})[root]
        links = sorted(links, key=lambda item: item[1].first)
        part = self.part
        nodes = part.nodes
        local = Partition(self.space_id, self.rules)
        for x in idents:
            local.singleton(x, nodes[x].birth)
        lnodes = local.nodes
        decisions: list[Decision] = []
        # Union-find over the links that still link, to see whether the component fell apart.
        parent: dict[Ident, Ident] = {x: x for x in idents}

        def find(x: Ident) -> Ident:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        group_links: list[tuple[bytes, Ident | None]] = []
        for sk, ln in links:
            eff = self.effective(ln)
            if len(eff) < 2:
                group_links.append((sk, None))
                continue
            decisions.extend(local.step([lnodes[x] for x in eff], ln.first))
            a = find(eff[0])
            for y in eff[1:]:
                b = find(y)
                if a != b:
                    parent[b] = a
            group_links.append((sk, eff[0]))

        # Adopt the new partition.
        before: list[str] = []
        for x in idents:
            n = nodes[x]
            p = part.plist[n.p]
            before.append(p.pid)
            p.members.discard(n)
            p.founded = None
            if not p.members:
                part._drop(p)
        for x, old in zip(idents, before, strict=True):
            n = nodes[x]
            new = local.plist[lnodes[x].p].pid
            q = part.named(new)
            q.members.add(n)
            q.founded = None
            n.p = q.index
            if old != new:
                n.changed = True

        # Components: the largest group keeps the id, lone identifiers have none.
        groups: dict[Ident, list[Ident]] = {}
        for x in idents:
            groups.setdefault(find(x), []).append(x)
        ordered = sorted(groups.values(), key=lambda g: (-len(g), min(g)))
        gid: dict[Ident, int | None] = {}
        self.components.pop(root, None)
        for i, g in enumerate(ordered):
            cid: int | None
            if len(g) == 1:
                cid = None
            else:
                if i == 0:
                    cid = root
                else:
                    cid = self.new_component_id()
                    self.new_components.add(cid)
                self.components[cid] = ComponentState(None, len(g))
                self.changed_components.add(cid)
            for x in g:
                gid[find(x)] = cid
                n = nodes[x]
                if n.comp != cid:
                    n.comp = cid
                    n.changed = True
        if root not in self.components:
            self.removed_components.add(root)
        for sk, anchor in group_links:
            ln = self.links[sk]
            cid = None if anchor is None else gid[find(anchor)]
            if ln.component != cid:
                ln.component = cid
                self.changed_links.add(sk)
            if cid is not None:
                c = self.components[cid]
                if c.max_key is None or ln.first > c.max_key:
                    c.max_key = ln.first

        # Merge log: keep what is decided again, supersede the rest, record what is new.
        keys = {ln.first for _, ln in links} | self.replaced_keys
        self.decisions = [d for d in self.decisions if d.key not in keys]
        recorded = {d: i for d, i in self.recorded.items() if d.key in keys}
        fresh = set(decisions)
        self.superseded.extend(i for d, i in recorded.items() if d not in fresh)
        for d in recorded:
            del self.recorded[d]
        seen: set[Decision] = set()
        for d in decisions:
            if d not in recorded and d not in seen:
                self.decisions.append(d)
                seen.add(d)

    def detach(self, x: Ident) -> int | None:
        """Makes `x` link nothing from now on; returns its component (to recompute)."""
        self.isolated.add(x)
        self.part.nodes[x].changed = True
        return self.root_of(x)

    def cut(self, sk: bytes) -> int | None:
        """Makes a link link nothing from now on; returns its component (to recompute)."""
        ln = self.links[sk]
        ln.cut = True
        self.changed_links.add(sk)
        return None if ln.component is None else self.find(ln.component)

    def forget(self, gone: set[Ident]) -> None:
        """Deletes identifiers (a deleted profile's) from the graph and from every link, and
        marks what they touched for recomputation. The links that contain them, and the links
        of the remaining sets, must be loaded."""
        part = self.part
        for x in gone:
            root = self.root_of(x)
            if root is not None:
                self.dirty.add(root)
            n = part.nodes.pop(x)
            p = part.plist[n.p]
            p.members.discard(n)
            p.founded = None
            if not p.members:
                part._drop(p)
            self.isolated.discard(x)
            self.removed_idents.add(x)
        for sk, ln in list(self.links.items()):
            if not any(x in gone for x in ln.idents):
                continue
            del self.links[sk]
            self.changed_links.discard(sk)
            self.removed_links.add(sk)
            if ln.component is not None:
                self.dirty.add(self.find(ln.component))
            rest = tuple(x for x in ln.idents if x not in gone)
            if len(rest) < 2:
                continue
            nk = set_key(rest)
            other = self.links.get(nk)
            if other is None:
                self.links[nk] = LinkState(rest, ln.first, ln.cut, ln.component)
                if nk in self.removed_links:
                    self.removed_links.discard(nk)  # its row stays, rewritten
                else:
                    self.new_links.add(nk)
                self.changed_links.add(nk)
            elif ln.first < other.first:
                self.replaced_keys.add(other.first)
                other.first = ln.first
                self.changed_links.add(nk)


# ---------------------------------------------------------------------------------------------
# Driving a graph: what to load, in which order (the store and the tests' memory store load)


class GraphLoader(Protocol):
    """Fills a Graph from storage. Each method adds what is not in the graph yet and leaves
    what is (the graph's own state is newer)."""

    async def load_idents(self, graph: Graph, idents: Sequence[Ident]) -> None:
        """The identifiers, every member of their profiles, and their components' rows."""

    async def load_links(self, graph: Graph, keys: Sequence[bytes]) -> None:
        """The links with these set keys."""

    async def load_components(self, graph: Graph, cids: Sequence[int]) -> None:
        """Every identifier and link of these components."""

    async def load_decisions(self, graph: Graph, keys: Sequence[Key]) -> None:
        """The merge log's current (not superseded) decisions caused by these keys."""


class StaleOverlay(Exception):
    """The previous batch's graph cannot stand in for what it is still writing (a case the
    overlay does not cover): the batch is prepared again once that write is committed."""


class OverlayLoader:
    """Loads a batch's slice while the previous batch of the space is still being written:
    what the previous batch touched comes from its final graph (`prev`), the rest from `base`
    (storage as it was before that write, or after it: the write may commit meanwhile), with
    the components `prev` merged renamed as its write renames them. Every profile and component
    the previous batch touched is whole in its graph where it changed them (loads bring whole
    profiles, recomputations whole components), so what `base` returns is either untouched by
    it or overridden by `prev`. Serves the fast path (`observe_batch`) and `settle`: a
    component is what storage has under any of the ids `prev` renamed to it, with `prev`'s
    members and links over it; the merge log's current decisions are storage's less those
    `prev` supersedes, with `prev`'s new ones (which must be numbered: `Graph.number`)."""

    def __init__(self, base: GraphLoader, prev: Graph) -> None:
        self.base = base
        self.prev = prev

    def _component(self, graph: Graph, cid: int | None, state: ComponentState | None) -> int | None:
        prev = self.prev
        if cid is None:
            return None
        if cid in prev.alias or cid in prev.components or cid in prev.removed_components:
            root = prev.find(cid)
            mine = prev.components.get(root)
            if mine is None:
                raise StaleOverlay(f"component {cid} was dissolved by the previous batch")
            graph.load_component(root, mine.max_key, mine.size)
            return root
        if state is not None:
            graph.load_component(cid, state.max_key, state.size)
        return cid

    def _prev_ident(self, graph: Graph, n: Node) -> None:
        prev = self.prev
        c = n.comp
        graph.load_ident(
            n.ident,
            prev.part.plist[n.p].pid,
            self._component(graph, None if c is None else prev.find(c), None),
            n.birth,
            n.ident in prev.isolated,
        )

    def _prev_link(self, graph: Graph, sk: bytes, ln: LinkState) -> None:
        c = ln.component
        cid = None if c is None else self._component(graph, self.prev.find(c), None)
        graph.load_link(sk, ln.idents, ln.first, ln.cut, cid)

    async def load_idents(self, graph: Graph, idents: Sequence[Ident]) -> None:
        prev = self.prev
        pnodes, pprofiles = prev.part.nodes, prev.part.profiles
        fresh = []
        for x in idents:
            if graph.has(x):
                continue
            pn = pnodes.get(x)
            if pn is not None:
                for m in prev.part.plist[pn.p].members:
                    self._prev_ident(graph, m)
            elif x in prev.removed_idents:
                raise StaleOverlay("an identifier was deleted by the previous batch")
            else:
                fresh.append(x)
        if not fresh:
            return
        scratch = Graph(graph.space_id, graph.rules)
        await self.base.load_idents(scratch, fresh)
        for x, n in scratch.part.nodes.items():
            pid = scratch.part.plist[n.p].pid
            if x in pnodes or pid in pprofiles:
                raise StaleOverlay("a profile the previous batch changed came back from storage")
            cid = n.comp
            graph.load_ident(
                x,
                pid,
                self._component(graph, cid, None if cid is None else scratch.components.get(cid)),
                n.birth,
                x in scratch.isolated,
            )

    async def load_links(self, graph: Graph, keys: Sequence[bytes]) -> None:
        prev = self.prev
        fresh = []
        for sk in keys:
            if sk in graph.links:
                continue
            ln = prev.links.get(sk)
            if ln is not None:
                self._prev_link(graph, sk, ln)
            elif sk in prev.removed_links:
                raise StaleOverlay("a link was deleted by the previous batch")
            else:
                fresh.append(sk)
        if not fresh:
            return
        scratch = Graph(graph.space_id, graph.rules)
        await self.base.load_links(scratch, fresh)
        for sk, ln in scratch.links.items():
            graph.load_link(sk, ln.idents, ln.first, ln.cut, self._component(graph, ln.component, None))

    async def load_components(self, graph: Graph, cids: Sequence[int]) -> None:
        prev = self.prev
        if prev.removed_idents or prev.removed_links:
            raise StaleOverlay("the previous batch deleted identifiers")
        wanted = set(cids)
        for c in wanted:
            if c in prev.removed_components and c not in prev.alias:
                raise StaleOverlay(f"component {c} was dissolved by the previous batch")
        # Storage has a component under its own id, or (until the previous write commits)
        # under the ids that write renames to it.
        stored = sorted(wanted | {c for c in prev.alias if prev.find(c) in wanted})
        scratch = Graph(graph.space_id, graph.rules)
        await self.base.load_components(scratch, stored)
        pnodes, plinks = prev.part.nodes, prev.links
        mine = {r for c in wanted if (r := prev.find(c)) in prev.components}
        if mine:
            # What the previous batch has of them (its new members and links included).
            for idents, links in prev.members_of(mine).values():
                for x in idents:
                    self._prev_ident(graph, pnodes[x])
                for sk, ln in links:
                    self._prev_link(graph, sk, ln)
        for x, n in scratch.part.nodes.items():
            pn = pnodes.get(x)
            if pn is not None:
                self._prev_ident(graph, pn)  # its state after the previous write
                continue
            if scratch.part.plist[n.p].pid in prev.part.profiles:
                raise StaleOverlay("a profile the previous batch changed came back from storage")
            cid = n.comp
            graph.load_ident(
                x,
                scratch.part.plist[n.p].pid,
                self._component(graph, cid, None if cid is None else scratch.components.get(cid)),
                n.birth,
                x in scratch.isolated,
            )
        for sk, ln in scratch.links.items():
            pl = plinks.get(sk)
            if pl is not None:
                self._prev_link(graph, sk, pl)
            else:
                graph.load_link(sk, ln.idents, ln.first, ln.cut, self._component(graph, ln.component, None))

    async def load_decisions(self, graph: Graph, keys: Sequence[Key]) -> None:
        prev = self.prev
        if len(prev.decision_ids) != len(prev.decisions):
            raise StaleOverlay("the previous batch's decisions have no merge log ids yet")
        scratch = Graph(graph.space_id, graph.rules)
        await self.base.load_decisions(scratch, keys)
        gone = set(prev.superseded)
        for d, i in scratch.recorded.items():
            if i not in gone:
                graph.recorded.setdefault(d, i)
        wanted = set(keys)
        for d, i in zip(prev.decisions, prev.decision_ids, strict=True):
            if d.key in wanted:
                graph.recorded.setdefault(d, i)


async def apply(graph: Graph, loader: GraphLoader, observed: Sequence[Observed]) -> None:
    """Applies a batch of events of one space in key order, then recomputes what went late."""
    await observe_batch(graph, loader, observed)
    await settle(graph, loader)


# Events between two yields to the event loop while a batch is applied (a few milliseconds):
# the previous batch's commit, in flight meanwhile, sends its next statement at each, so the
# database does not wait for the whole batch to be prepared.
YIELD_EVERY = 200


async def observe_batch(graph: Graph, loader: GraphLoader, observed: Sequence[Observed]) -> None:
    """The first half of `apply`: loads what the batch touches and applies its events in key
    order; late ones leave their components dirty for `settle`."""
    await loader.load_idents(graph, list({x for o in observed for x in o.idents}))  # the store sorts
    # A person's events mostly carry the same identifiers (every page view of a logged-in
    # browser: its userId and anonymousId): each set's digest once per batch.
    digests: dict[tuple[Ident, ...], bytes] = {}
    sks: list[bytes] = []
    for o in observed:
        ids = o.idents
        sk = b""
        if len(ids) > 1:
            sk = digests.get(ids, b"")
            if not sk:
                sk = digests[ids] = set_key(ids)
        sks.append(sk)
    await loader.load_links(graph, sorted({k for k in sks if k}))
    step = graph.observe
    for n, i in enumerate(sorted(range(len(observed)), key=lambda i: observed[i].key), 1):
        o = observed[i]
        step(o.idents, o.key, sks[i] or None, o.device)
        if n % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a batch in flight on the same event loop moves on meanwhile


async def settle(graph: Graph, loader: GraphLoader) -> None:
    """Recomputes every dirty component, loading it first."""
    while graph.dirty:
        roots = set(graph.dirty)
        owners = graph.owners(roots)  # loading adds no merged ids
        await loader.load_components(graph, sorted(owners))
        mine = [ln for ln in graph.links.values() if ln.component is not None and ln.component in owners]
        missing = {x for ln in mine for x in ln.idents if not graph.has(x)}
        if missing:
            await loader.load_idents(graph, sorted(missing))
        await loader.load_decisions(graph, sorted({ln.first for ln in mine} | graph.replaced_keys))
        members = graph.members_of(roots)  # recomputing one leaves the others' members as they are
        for n, r in enumerate(sorted(roots), 1):
            graph.recompute(r, members[r])
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # as observe_batch


# ---------------------------------------------------------------------------------------------
# Page tokens


def encode_token(*parts: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_token(token: str, n: int) -> list[Any] | None:
    """The parts of a page token, or None when it is not one of ours."""
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(parts, list) or len(parts) != n:
        return None
    return parts
