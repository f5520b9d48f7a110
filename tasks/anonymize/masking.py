"""Masking values: one deterministic function per rule, in Python for the COPY stream and
in SQL for in-place updates, with the same results.

Determinism is what makes masked data usable: a masked value is a function of the rule,
the secret salt and the source value only (HMAC-SHA256 keyed by the salt), so the same
email masks to the same output in every table and every night, joins on masked columns
still match, and nobody without the salt can map a masked value back.

Speed: a Faker call costs ~70 us, so each Faker provider is called once per run to fill
a pool (seeded from the salt), and a value picks its pool entry by its keyed hash. The
HMAC's inner and outer states are precomputed (0.6 us a value instead of 1.5 us for
hmac.digest). PostgreSQL has sha256() but no HMAC, so the SQL side builds the same HMAC
from the padded key blocks: sha256(opad || sha256(ipad || value)).

Values are hashed in their text form as COPY prints it (the type's output function under
pinned DateStyle/TimeZone), so the stream and the in-place SQL agree on what "the same
value" is. NULL stays NULL under every rule.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache

from psycopg import sql

from dataops.errors import BadInput
from dataops.settings import _MASK_SEPARATORS, ColumnRule
from dataops.tasks.anonymize.sql_rules import NUMBER_TYPES, SQL_KINDS, choice_values, parse_path, rule_sql

NULL = b"\\N"
TEXT_TYPES = {"text", "varchar", "bpchar", "citext", "name"}
INT_RANGES = {"int2": 1 << 15, "int4": 1 << 31, "int8": 1 << 56}
DATE_TYPES = {"date", "timestamp", "timestamptz"}
INET_TYPES = {"inet", "cidr"}
HASHABLE = TEXT_TYPES | set(INT_RANGES) | INET_TYPES | {"uuid"}  # the types the hash rule takes
SUFFIX_BYTES = 8  # unique suffix: 16 hex digits, so a million values collide with odds ~3e-8
SUFFIX_CHARS = SUFFIX_BYTES * 2 + 1  # "-" or "." and the hex digits
FIT_CALLS = 4  # a pool filtered to a column's width calls its provider at most this many times its size
MIN_DISTINCT = 20  # a filtered pool with fewer distinct values than this (or than the provider gives) is refused


# -- COPY text format ----------------------------------------------------------------------

_UNESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t",
              ord("v"): b"\v"}
_ESCAPE_SEQ = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)


def _unescape_match(m: re.Match) -> bytes:
    if m.group(1):
        return bytes([int(m.group(1), 8) & 0xFF])
    if m.group(2):
        return bytes([int(m.group(2), 16)])
    ch = m.group(3)[0]
    return _UNESCAPES.get(ch, m.group(3))


def unescape(field: bytes) -> bytes:
    """A COPY text field (not \\N) to the value's bytes."""
    if b"\\" not in field:
        return field
    return _ESCAPE_SEQ.sub(_unescape_match, field)


def escape(value: bytes) -> bytes:
    """A value's bytes to a COPY text field: backslash, tab, newline and CR escaped."""
    if b"\\" in value:
        value = value.replace(b"\\", b"\\\\")
    if b"\t" in value:
        value = value.replace(b"\t", b"\\t")
    if b"\n" in value:
        value = value.replace(b"\n", b"\\n")
    if b"\r" in value:
        value = value.replace(b"\r", b"\\r")
    return value


# -- the keyed hash ------------------------------------------------------------------------

class Keyed:
    """HMAC-SHA256 keyed by the salt, with the pad states computed once."""

    def __init__(self, salt: str | bytes):
        key = salt.encode() if isinstance(salt, str) else salt
        self._salt = key
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self.ipad = bytes(b ^ 0x36 for b in key)
        self.opad = bytes(b ^ 0x5C for b in key)
        self._inner = hashlib.sha256(self.ipad).copy
        self._outer = hashlib.sha256(self.opad).copy
        self.fingerprint = hashlib.sha256(b"dataops-key-id" + key).hexdigest()[:12]  # safe to show

    def __reduce__(self):  # hashlib states do not pickle; worker processes rebuild them
        return (Keyed, (self._salt,))

    def digest(self, value: bytes) -> bytes:
        inner = self._inner()
        inner.update(value)
        outer = self._outer()
        outer.update(inner.digest())
        return outer.digest()

    def sql_digest(self, expr: sql.Composable) -> sql.Composed:
        """The same HMAC in SQL over a text expression (core sha256 only, no pgcrypto)."""
        return sql.SQL("sha256({} || sha256({} || convert_to({}, 'UTF8')))").format(
            sql.Literal(self.opad), sql.Literal(self.ipad), expr)

    def seed(self, *parts: str) -> int:
        return int.from_bytes(self.digest("\0".join(parts).encode())[:8], "big")


def suffix_of(d: bytes) -> str:
    return d[7:7 + SUFFIX_BYTES].hex()


def shift_of(d: bytes, days: int) -> int:
    """An offset in [-days, -1] or [1, days]: never 0, so every date moves."""
    k = int.from_bytes(d[:7], "big") % (2 * days)
    return k - days if k < days else k - days + 1


def uniquify(value: str, d: bytes) -> str:
    """Make pool values distinct per input: local.<hex>@domain for emails, value-<hex> otherwise."""
    local, at, domain = value.partition("@")
    return f"{local}.{suffix_of(d)}@{domain}" if at else f"{value}-{suffix_of(d)}"


def _sql_int56(d: sql.Composable) -> sql.Composed:
    return sql.SQL("('x' || encode(substring({} from 1 for 7), 'hex'))::bit(56)::bigint").format(d)


def _sql_suffix(d: sql.Composable) -> sql.Composed:
    return sql.SQL("encode(substring({} from 8 for {}), 'hex')").format(d, sql.Literal(SUFFIX_BYTES))


def _sql_uniquify(v: sql.Composable, d: sql.Composable) -> sql.Composed:
    return sql.SQL("CASE WHEN strpos({v}, '@') > 0 THEN left({v}, strpos({v}, '@') - 1) || '.' || {s} "
                   "|| substr({v}, strpos({v}, '@')) ELSE {v} || '-' || {s} END").format(v=v, s=_sql_suffix(d))


# -- Faker pools -----------------------------------------------------------------------------

def _render(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


_POOLS: dict[tuple, list[str]] = {}
_POOL_LOCK = threading.RLock()  # one Faker instance per locale, reseeded per pool: one user at a time


@lru_cache(maxsize=32)
def _faker(locale: str):
    from faker import Faker

    try:
        return Faker(locale)
    except AttributeError:
        raise BadInput(f'unknown Faker locale "{locale}"; use one like en_US, de_DE, fr_FR') from None


def check_provider(provider: str, locale: str) -> None:
    """An unknown provider or locale is bad input, found before anything is copied."""
    with _POOL_LOCK:  # calling the provider moves the shared instance's random state
        _check_provider(provider, locale)


def _check_provider(provider: str, locale: str) -> None:
    import difflib

    fake = _faker(locale)
    try:
        fn = getattr(fake, provider)
    except AttributeError:
        fn = None
    if provider.startswith("_") or not callable(fn):
        names = [n for n in dir(fake) if not n.startswith("_")]
        close = difflib.get_close_matches(provider, names, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else "; see https://faker.readthedocs.io/en/master/providers.html"
        raise BadInput(f'unknown Faker provider "{provider}" for locale {locale}{hint}')
    try:
        fn()
    except TypeError:
        raise BadInput(f'Faker provider "{provider}" needs arguments; use one that takes none') from None


def faker_pool(keyed: Keyed, provider: str, locale: str, size: int, max_chars: int | None = None) -> list[str]:
    """`size` values of one provider, the same for the same salt, provider, locale and size.

    With `max_chars`, only values of at most that many characters: the provider is called
    on from the same seed (its first `size` values are the unfiltered pool's) until `size`
    values fit or FIT_CALLS times `size` calls were made, so the filtered pool is as
    deterministic as the plain one and needs no database. It may hold fewer than `size`
    values (see fit_stats). Faker's own output for a seed may change between Faker
    versions; pin Faker to keep staging identical from night to night.
    """
    return _pool_and_calls(keyed, provider, locale, size, max_chars)[0]


def fit_stats(keyed: Keyed, provider: str, locale: str, size: int, max_chars: int) -> tuple[int, int, int, int]:
    """(values kept, distinct values kept, provider calls made, distinct values of the
    unfiltered pool) of the pool filtered to `max_chars` characters."""
    pool, calls = _pool_and_calls(keyed, provider, locale, size, max_chars)
    return len(pool), len(set(pool)), calls, len(set(faker_pool(keyed, provider, locale, size)))


def _pool_and_calls(keyed: Keyed, provider: str, locale: str, size: int,
                    max_chars: int | None) -> tuple[list[str], int]:
    key = (keyed.fingerprint, provider, locale, size, max_chars)
    with _POOL_LOCK:
        found = _POOLS.get(key)
        if found is None:
            check_provider(provider, locale)
            fake = _faker(locale)
            fake.seed_instance(keyed.seed("pool", provider, locale, str(size)))
            fn = getattr(fake, provider)
            if max_chars is None:
                pool = [_render(fn()) for _ in range(size)]
                calls = size
            else:
                pool, calls = [], 0
                while len(pool) < size and calls < size * FIT_CALLS:
                    v = _render(fn())
                    calls += 1
                    if len(v) <= max_chars:  # characters, as varchar(n) and char(n) count them
                        pool.append(v)
                    if calls == size and len(pool) * 100 < size:
                        break  # under 1% fit: calling on would not make a usable pool
            if len(_POOLS) > 64:
                _POOLS.clear()
            found = _POOLS[key] = (pool, calls)
        return found


# -- partial masks and date shifts -----------------------------------------------------------

_NOT_SEPARATOR = re.compile("[^" + re.escape(_MASK_SEPARATORS) + "]")


def partial_mask(s: str, keep_last: int, mask: str) -> str:
    """Mask every character but separators and the last `keep_last` others; a value with no
    more than `keep_last` maskable characters is masked whole (it would be kept whole)."""
    kept, i = 0, len(s)
    while i > 0 and kept < keep_last:  # find where the readable tail starts
        i -= 1
        if s[i] not in _MASK_SEPARATORS:
            kept += 1
    head = s[:i]
    if kept < keep_last or not _NOT_SEPARATOR.search(head):
        return _NOT_SEPARATOR.sub(mask, s)
    return _NOT_SEPARATOR.sub(mask, head) + s[i:]


# the same classes for PostgreSQL's regular expressions (the dash last, so it is literal)
_PG_SEP = "[" + "".join(c for c in _MASK_SEPARATORS if c != "-") + "-]"
_PG_NOT_SEP = "[^" + "".join(c for c in _MASK_SEPARATORS if c != "-") + "-]"


def shift_text(text: str, offset: int) -> str:
    """Move a date/timestamp printed as ISO (UTC) by whole days; infinities and values
    Python's date cannot hold (BC, year > 9999) are left as they are."""
    if len(text) < 10 or text.endswith("BC"):
        return text
    try:
        day = date.fromisoformat(text[:10]) + timedelta(days=offset)
    except (ValueError, OverflowError):
        return text
    return day.isoformat() + text[10:]


# -- column information ------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type, e.g. character varying(200)
    base: str  # base type name after domains, e.g. varchar
    not_null: bool
    unique: bool  # part of a unique index or constraint
    max_length: int | None  # characters of varchar(n)/char(n), also through a domain
    domain: str | None = None  # the domain's name when the column's type is one (its checks apply)
    identity: str = ""  # pg_attribute.attidentity: a (ALWAYS), d (BY DEFAULT) or ""


# -- compiled rules ----------------------------------------------------------------------------

@dataclass
class Masker:
    """One column's rule, checked against its column and ready to run.

    `py(value, digest, fields)` maps an unescaped source value (bytes) and its keyed digest
    to the output text (str); `fields` are the raw COPY fields of the row (templates read
    other columns). `in_sql` rules (null, constant) are applied in the source SELECT
    instead, so a table that needs nothing else streams through without being parsed.
    Maskers pickle (for worker processes): the Python function is rebuilt on first use.
    A Faker pool is built on first use too (~0.5 s each): a refresh builds its pools while
    the tables that need none are already copying (fill_pools).
    """

    column: Column
    rule: ColumnRule
    kind: str
    unique: bool
    keyed: Keyed
    pool_spec: tuple[str, str, int, int | None] | None = None  # Faker (provider, locale, size, max characters)
    in_sql: bool = False
    constant: str | None = None
    locale: str | None = None
    refs: dict[str, int] = field(default_factory=dict)  # template column -> field index
    where: str = ""  # where the rule was given (anonymize.rules.users.email), for errors
    pool_note: str = ""  # why the pool holds fewer values than its provider gives, for the label
    subs: list["Masker"] = field(default_factory=list)  # json: one per path; cases: one per case, then else
    paths: list[tuple] = field(default_factory=list)  # json: the parsed paths, in the order of subs
    _py: Callable[[bytes, bytes, list[bytes]], str] | None = field(default=None, repr=False, compare=False)
    _pool: list[str] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_py": None}

    @property
    def pool(self) -> list[str] | None:
        """The Faker pool of a faker rule (None for other rules), built on first use."""
        if self._pool is None and self.pool_spec is not None:
            self._pool = faker_pool(self.keyed, *self.pool_spec)
        return self._pool

    def set_pool(self, pool: list[str], note: str) -> None:
        """Replace the pool by a filtered one (it goes along when the masker is pickled)."""
        self._pool, self._py = pool, None
        self.pool_note = note

    @property
    def signature(self) -> tuple:
        """What decides a value's output: maskers with equal signatures mask a value alike
        (a foreign key's two sides must)."""
        return (self.kind, self.rule.model_dump_json(exclude={"unique", "locale"}), self.unique,
                tuple(self.pool) if self.pool_spec else None, self.constant)

    def room(self) -> int | None:
        """Characters left for a Faker value in this column, or None when unbounded."""
        if not self.column.max_length:
            return None
        return self.column.max_length - (SUFFIX_CHARS if self.unique else 0)

    def make_unique(self) -> None:
        """Add the keyed suffix (the other side of a foreign key has it); refits the pool."""
        self.unique, self._py = True, None
        if self.pool_spec and self.column.max_length:
            self.fit_room(self.room())

    def fit_room(self, room: int) -> bool:
        """Keep the Faker values of at most `room` characters; True when the pool changed."""
        before = self.pool_spec
        self.pool_spec, self._pool, self._py = (*self.pool_spec[:3], None), None, None
        _fit_pool(self, *self.pool_spec[:3], lambda msg: BadInput(f"{self.where}: {msg}"), room=room)
        return self.pool_spec != before

    @property
    def by_postgres(self) -> bool:
        """Evaluated by PostgreSQL in the refresh's source SELECT too (dataops.tasks.anonymize.sql_rules):
        the stream reads the masked value and the original side by side, for the leak scan."""
        return self.kind in SQL_KINDS

    @property
    def track_source(self) -> bool:
        """Its source values go to the leak scan's set of values that must not reappear. Not
        moved dates and numbers (noise, generalize, shift_days): other rows hold them by chance.
        Not the categories a choice replaces, nor json documents whose written documents are not
        compared either: only a compared output could meet them, and a compared output (a hash,
        a template, an email) is never a whole document or a category by design."""
        if self.kind == "choice":
            return False
        if self.kind == "json":
            return self.track_output
        if self.kind == "cases":
            return any(s.track_source for s in self.subs)
        return self.kind not in ("shift_days", "noise", "generalize")

    @property
    def row_free(self) -> bool:
        """Masked by PostgreSQL in the copy's SELECT with nothing for the leak scan to take
        from each row (no digest either way): its table can stream through two psql processes
        without a row passing through Python; its values are counted by SQL instead."""
        return self.in_sql or (self.by_postgres and not self.track_source and not self.track_output)

    @property
    def track_output(self) -> bool:
        """Its written values are compared with every masked source value: rules whose output
        is not meant to coincide with real values (a Faker pick, a choice, a moved date may)."""
        if self.kind == "faker":
            return self.unique
        if self.kind in ("cases", "json"):  # json: whole documents; a choice or noise inside one can give
            return all(s.kind in ("keep", "null") or s.track_output for s in self.subs)  # another row's document
        return self.kind in ("hash", "template", "partial", "regex")

    @property
    def py(self) -> Callable[[bytes, bytes, list[bytes]], str]:
        if self._py is None:
            self._py = _python_function(self)
        return self._py

    @property
    def label(self) -> str:
        r = self.rule
        if self.kind == "faker":
            fitted = self.pool_spec[3] if self.pool_spec else None
            return (f"faker {r.faker}" + (f" ({self.locale})" if self.locale else "")
                    + (" unique" if self.unique else "") + (f", values of up to {fitted} characters" if fitted else "")
                    + (f", {self.pool_note}" if self.pool_note else ""))
        if self.kind == "template":
            return f"template {r.template}" + (" unique" if self.unique else "")
        if self.kind == "constant":
            return "constant"
        if self.kind == "hash":
            return f"keyed hash ({r.hash.length})" if self.column.base in TEXT_TYPES else "keyed hash"
        if self.kind == "partial":
            return f"partial (keep last {r.partial.keep_last})"
        if self.kind == "shift_days":
            return f"shift up to {r.shift_days} days"
        if self.kind == "noise":
            return f"noise up to {r.noise.percent:g}%" if r.noise.percent else f"noise up to {r.noise.bound:g}"
        if self.kind == "regex":
            return f"regex {r.regex.pattern} -> {r.regex.replace}"
        if self.kind == "choice":
            return f"choice of {len(r.choice.values)}" + (" (weighted)" if r.choice.weights else "")
        if self.kind == "generalize":
            g = r.generalize
            return (f"generalize to multiples of {g.step:g}" if g.step is not None else
                    f"generalize to {g.to}" if g.to else f"generalize to the first {g.prefix} characters")
        if self.kind == "json":
            return "json " + ", ".join(f"{p}: {s.label}" for p, s in zip(r.json_paths, self.subs))
        if self.kind == "cases":
            return "cases " + "; ".join([f"when {c.when}: {s.label}" for c, s in zip(r.cases, self.subs)]
                                        + [f"else: {self.subs[-1].label}"])
        return self.kind

    # -- SQL, for in-place updates and for the source SELECT of null/constant ------------------
    @property
    def needs_digest(self) -> bool:
        return self.kind in ("faker", "template", "hash", "shift_days")

    def digest_sql(self, col: sql.Composable) -> sql.Composed:
        return self.keyed.sql_digest(sql.SQL("concat({})").format(col))

    def pick_sql(self, d: sql.Composable, pool_table: sql.Composable, pool_id: int) -> sql.Composed:
        return sql.SQL("(SELECT v FROM {} WHERE pool = {} AND i = {} % {})").format(
            pool_table, sql.Literal(pool_id), _sql_int56(d), sql.Literal(len(self.pool)))

    def sql(self, col: sql.Composable, d: sql.Composable | None = None, pick: sql.Composable | None = None,
            refs: dict[str, sql.Composable] | None = None, cast: bool = True) -> sql.Composable:
        """An expression giving the masked value of `col` (NULL stays NULL), cast to the column type.

        `d` refers to the value's digest (digest_sql) and `pick` to its pool entry (pick_sql),
        computed once per row by the caller; `refs` maps template columns to expressions.
        `cast=False`: the value before the cast (an explicit cast to varchar(n) would cut
        a value that is too long instead of refusing it), for the rule checks.
        """
        if self.kind in SQL_KINDS:
            return rule_sql(self, col, refs, cast)
        typ = sql.SQL(self.column.type)
        if self.kind == "null":
            return sql.SQL("NULL::{}").format(typ)
        if self.column.base in TEXT_TYPES:  # text, which the column takes by assignment: a value too long for
            typ = sql.SQL("text")           # varchar(n) is an error there, where an explicit cast would cut it
        if self.kind == "keep":
            return col
        text = sql.SQL("concat({})").format(col)  # concat() prints with the output function, like COPY
        if self.kind == "constant":
            expr = sql.Literal(self.constant)
        elif self.kind == "partial":
            p = self.rule.partial
            mask = sql.Literal(p.mask)
            expr = sql.SQL("CASE WHEN length(regexp_replace({t}, {sep}, '', 'g')) <= {n} "
                           "THEN regexp_replace({t}, {nsep}, {m}, 'g') "
                           "ELSE regexp_replace({t}, {look}, {m}, 'g') END").format(
                t=text, sep=sql.Literal(_PG_SEP), nsep=sql.Literal(_PG_NOT_SEP), n=sql.Literal(p.keep_last),
                m=mask, look=sql.Literal(f"{_PG_NOT_SEP}(?=(?:{_PG_SEP}*{_PG_NOT_SEP}){{{p.keep_last}}})"))
        else:
            d = d if d is not None else self.digest_sql(col)
            if self.kind == "faker":
                expr = _sql_uniquify(pick, d) if self.unique else pick
            elif self.kind == "template":
                parts = []
                for literal, name, _, _ in _template_parts(self.rule.template):
                    if literal:
                        parts.append(sql.Literal(literal))
                    if name == "hash":
                        parts.append(sql.SQL("encode(substring({} from 1 for 8), 'hex')").format(d))
                    elif name is not None:
                        ref = (refs or {}).get(name, sql.Identifier(name))
                        parts.append(sql.SQL("concat({})").format(ref))
                expr = sql.SQL("({})").format(sql.SQL(" || ").join(parts)) if parts else sql.Literal("")
                if self.unique:
                    expr = _sql_uniquify(expr, d)
            elif self.kind == "hash":
                base = self.column.base
                if base in INT_RANGES:
                    expr = sql.SQL("({} % {})").format(_sql_int56(d), sql.Literal(INT_RANGES[base]))
                elif base == "uuid":
                    expr = sql.SQL("encode(substring({} from 1 for 16), 'hex')::uuid::text").format(d)
                elif base in INET_TYPES:
                    expr = sql.SQL("'10.' || get_byte({d}, 0) || '.' || get_byte({d}, 1) || '.' || get_byte({d}, 2)"
                                   ).format(d=d)
                else:
                    expr = sql.SQL("left(encode({}, 'hex'), {})").format(d, sql.Literal(self.rule.hash.length))
            elif self.kind == "shift_days":
                n = self.rule.shift_days
                k = sql.SQL("({} % {})").format(_sql_int56(d), sql.Literal(2 * n))
                off = sql.SQL("(CASE WHEN {k} < {n} THEN {k} - {n} ELSE {k} - {n} + 1 END)::int").format(
                    k=k, n=sql.Literal(n))
                step = off if self.column.base == "date" else sql.SQL("make_interval(days => {})").format(off)
                if not cast:
                    return sql.SQL("CASE WHEN NOT isfinite({c}) THEN {c} ELSE {c} + {s} END").format(c=col, s=step)
                return sql.SQL("CASE WHEN {c} IS NULL OR NOT isfinite({c}) THEN {c} ELSE ({c} + {s})::{t} END").format(
                    c=col, s=step, t=typ)
            else:  # pragma: no cover - settings admit no other kind
                raise AssertionError(self.kind)
        if not cast:
            return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE ({}) END").format(col, expr)
        return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE ({})::{} END").format(col, expr, typ)


def _template_parts(template: str):
    import string

    return list(string.Formatter().parse(template))


def compile_rule(rule: ColumnRule, column: Column, *, keyed: Keyed, locale: str, pool_size: int,
                 columns: dict[str, int], masked: set[str], where: str) -> Masker:
    """Check one rule against its column and build its masker; `where` names the rule in errors
    (anonymize.rules.users.email). Raises BadInput for anything that would fail mid-copy."""
    kind = rule.kind
    base = column.base
    unique = rule.unique or (column.unique and kind == "faker")
    m = Masker(column=column, rule=rule, kind=kind, unique=unique, keyed=keyed, where=where)

    def bad(msg: str) -> BadInput:
        return BadInput(f"{where}: {msg}")

    if kind == "keep":
        return m
    if base == "oid" and kind not in ("null", "constant"):
        raise bad(f"column is {column.type}, the id of a large object (or a system object); use null")
    if kind == "null":
        if column.not_null:
            raise bad("column is NOT NULL; the null rule cannot apply (use constant, hash or faker)")
        m.in_sql = True
    elif kind == "constant":
        if column.unique:
            raise bad("column is unique; a constant would repeat (use hash or faker with unique: true)")
        c = rule.constant
        m.constant = ("true" if c else "false") if isinstance(c, bool) else str(c)
        if column.max_length and base in TEXT_TYPES and len(m.constant) > column.max_length:
            raise bad(f"the constant has {len(m.constant)} characters, more than {column.type} holds")
        m.in_sql = True
    elif kind == "partial":
        if base not in TEXT_TYPES:
            raise bad(f"partial masks apply to text columns, not {column.type}")
        if column.unique:
            raise bad("column is unique and partial masks collide; use faker or hash with unique: true")
    elif kind == "shift_days":
        if base not in DATE_TYPES:
            raise bad(f"shift_days applies to date and timestamp columns, not {column.type}")
    elif kind == "hash":
        if base in TEXT_TYPES:
            length = rule.hash.length
            if column.max_length and column.max_length < length:
                raise bad(f"hash length {length} exceeds {column.type}; set hash: {{length: {column.max_length}}}")
        elif base in INT_RANGES or base in INET_TYPES:
            if column.unique:
                raise bad(f"hashes of a unique {column.type} column can collide; keep it or use another rule")
        elif base != "uuid":
            raise bad(f"hash applies to text, integer, uuid and inet columns, not {column.type}")
    elif kind == "template":
        if base not in TEXT_TYPES:
            raise bad(f"templates apply to text columns, not {column.type}")
        for _, name, _, _ in _template_parts(rule.template):
            if name is None or name == "hash":
                continue
            if name == column.name:
                raise bad(f"template uses the column's own value {{{name}}}; that would copy it (use {{hash}})")
            if name not in columns:
                raise bad(f'template names column "{name}", which is not in the table')
            if name in masked:
                raise bad(f'template names column "{name}", which is masked itself; use unmasked columns or {{hash}}')
            m.refs[name] = columns[name]
        if column.max_length:  # the fixed part alone; values of the columns it names are tried on a sample
            shortest = sum(len(lit) + (2 * 8 if name == "hash" else 0) for lit, name, _, _ in
                           _template_parts(rule.template)) + (SUFFIX_CHARS if unique else 0)
            if shortest > column.max_length:
                raise bad(f"template values have at least {shortest} characters ({{hash}} gives 16, unique adds "
                          f"{SUFFIX_CHARS}), more than {column.type} holds; shorten the template or use "
                          f"hash: {{length: {column.max_length}}}")
    elif kind in SQL_KINDS:
        _compile_sql_rule(m, bad, keyed=keyed, locale=locale, pool_size=pool_size, columns=columns, masked=masked,
                          where=where)
    elif kind == "faker":
        loc = rule.locale or locale
        try:
            check_provider(rule.faker, loc)
        except BadInput as exc:
            raise bad(exc.message) from None
        m.pool_spec = (rule.faker, loc, pool_size, None)
        m.locale = loc if rule.locale else None
        if column.max_length:  # then the pool is needed now, to check its values fit
            _fit_pool(m, rule.faker, loc, pool_size, bad)
    return m


def _compile_sql_rule(m: Masker, bad: Callable[[str], BadInput], **args) -> None:
    """The checks of the rules PostgreSQL evaluates (the SQL itself: sql_rules)."""
    rule, column, kind = m.rule, m.column, m.kind
    base = column.base
    if kind in ("noise", "choice", "generalize", "regex") and column.unique:
        raise bad(f"column is unique and {kind} values collide; use faker or hash with unique: true")
    if kind == "noise":
        if base not in NUMBER_TYPES | DATE_TYPES:
            raise bad(f"noise applies to number, date and timestamp columns, not {column.type}")
        if base in DATE_TYPES and rule.noise.percent is not None:
            raise bad("noise on dates takes bound (days), e.g. noise: {bound: 30}, not percent")
    elif kind == "regex":
        if base not in TEXT_TYPES:
            raise bad(f"regex applies to text columns, not {column.type}")
        try:
            re.compile(rule.regex.pattern)  # PostgreSQL checks its own syntax on the sample (check_outputs)
        except re.error:
            pass
    elif kind == "choice":
        values = choice_values(m)
        if column.max_length and base in TEXT_TYPES:
            long = [v for v in values if len(v) > column.max_length]
            if long:
                raise bad(f"choice value {long[0]!r} has {len(long[0])} characters, more than {column.type} holds")
    elif kind == "generalize":
        g = rule.generalize
        if g.step is not None and base not in NUMBER_TYPES:
            raise bad(f"generalize: {{step: ...}} applies to number columns, not {column.type}")
        if g.to is not None and base not in DATE_TYPES:
            raise bad(f"generalize: {{to: {g.to}}} applies to date and timestamp columns, not {column.type}")
        if g.prefix is not None and base not in TEXT_TYPES:
            raise bad(f"generalize: {{prefix: ...}} applies to text columns, not {column.type}")
    elif kind == "json":
        if base not in ("json", "jsonb"):
            raise bad(f"json paths apply to json and jsonb columns, not {column.type}")
        for path, sub in rule.json_paths.items():
            here = f"{args['where']}.json.{path}"
            m.paths.append(parse_path(path, here))
            if sub.kind == "shift_days" or (
                    sub.kind == "generalize" and sub.generalize.to is not None):
                raise BadInput(f"{here}: {sub.kind} on dates inside json is not supported; mask the path with "
                               "hash, partial, choice or null")
            numeric = sub.kind == "noise" or (sub.kind == "generalize" and sub.generalize.step is not None)
            leaf = Column(column.name, "numeric" if numeric else "text", "numeric" if numeric else "text",
                          False, False, None)
            m.subs.append(compile_rule(sub, leaf, **{**args, "where": here}))
    elif kind == "cases":
        for i, case in enumerate(rule.cases):
            m.subs.append(compile_rule(case.rule, column, **{**args, "where": f"{args['where']}.cases[{i}].rule"}))
        m.subs.append(compile_rule(rule.fallback, column, **{**args, "where": f"{args['where']}.else"}))


def _fit_pool(m: Masker, provider: str, locale: str, pool_size: int, bad: Callable[[str], BadInput],
              room: int | None = None) -> None:
    """Keep only the Faker values that fit the column (with the unique suffix when there is
    one), counted in characters as varchar(n)/char(n) count them. A pool where all fit is
    left as it is, so the column masks like a text column under the same rule. Refused only
    when too few fit to be a pool: fewer than MIN_DISTINCT distinct values (or than the
    provider gives at all)."""
    column, unique = m.column, m.unique
    room = m.room() if room is None else room
    width = min(column.max_length or room, 64)
    if width < 8:  # shorter than a hash rule gives
        hint = "use a template (with {hash} only if the column is wide enough), "
    elif unique:
        hint = f"use hash: {{length: {width}}} (a keyed hex string, distinct for distinct values), "
    else:
        hint = f"use a template or hash: {{length: {width}}}, "
    if room < 1:
        raise bad(f"unique Faker values end in a {SUFFIX_CHARS}-character keyed suffix, which leaves no room in "
                  f"{column.type}; {hint}or widen the column")
    if max(len(v) for v in m.pool) <= room:
        return
    kept, distinct, calls, provider_distinct = fit_stats(m.keyed, provider, locale, pool_size, room)
    need = min(MIN_DISTINCT, provider_distinct)
    if distinct < need:
        if room == column.max_length:
            what = column.type
        elif room == m.room():
            what = f"{room} characters ({column.type} less the {SUFFIX_CHARS}-character unique suffix)"
        else:
            what = f"{room} characters (the narrower column of a foreign key)"
        raise bad(f"only {kept:,} of {calls:,} Faker {provider} values fit {what} ({distinct} distinct, at least "
                  f"{need} needed); {hint}a wider column, or another Faker provider")
    m.pool_spec = (provider, locale, pool_size, room)
    m._pool = None


def fill_pools(maskers) -> None:
    """Build every Faker pool these maskers use (a refresh runs this beside its first copies)."""
    for m in maskers:
        m.pool  # noqa: B018 - built on first use


def _python_function(m: Masker) -> Callable[[bytes, bytes, list[bytes]], str]:
    kind, rule, base = m.kind, m.rule, m.column.base
    if kind == "partial":
        keep, mask = rule.partial.keep_last, rule.partial.mask
        return lambda v, d, fields: partial_mask(v.decode(), keep, mask)
    if kind == "shift_days":
        days = rule.shift_days
        return lambda v, d, fields: shift_text(v.decode(), shift_of(d, days))
    if kind == "hash":
        if base in INT_RANGES:
            span = INT_RANGES[base]
            return lambda v, d, fields: str(int.from_bytes(d[:7], "big") % span)
        if base == "uuid":
            return lambda v, d, fields: str(uuidlib.UUID(bytes=d[:16]))
        if base in INET_TYPES:
            return lambda v, d, fields: f"10.{d[0]}.{d[1]}.{d[2]}"
        length = rule.hash.length
        return lambda v, d, fields: d.hex()[:length]
    if kind == "template":
        parts, refs, uniq = _template_parts(rule.template), m.refs, m.unique

        def template(v: bytes, d: bytes, fields: list[bytes]) -> str:
            out = []
            for literal, name, _, _ in parts:
                out.append(literal)
                if name == "hash":
                    out.append(d[:8].hex())
                elif name is not None:
                    raw = fields[refs[name]]
                    out.append("" if raw == NULL else unescape(raw).decode())
            s = "".join(out)
            return uniquify(s, d) if uniq else s

        return template
    if kind == "faker":
        pool, n = m.pool, len(m.pool)
        if m.unique:
            return lambda v, d, fields: uniquify(pool[int.from_bytes(d[:7], "big") % n], d)
        return lambda v, d, fields: pool[int.from_bytes(d[:7], "big") % n]
    raise AssertionError(f"{kind} rules are applied in SQL")  # pragma: no cover


def walk(m: Masker):
    """A masker and the maskers of its json paths and cases, depth first."""
    yield m
    for sub in m.subs:
        yield from walk(sub)
