"""What looks personal: the PII guard's detection, by column name, type, neighbours and content.

The guard refuses a refresh or an in-place anonymize while a personal-looking column has
no rule, so a new `users.passport_no` stops the nightly refresh instead of reaching
staging unmasked. A false alarm costs one `keep` line in dataops.yaml; a miss leaks a
person. So the words are broad, but each reason must be right: the line a user reads
says why the column was stopped (`orders.ship_address` is a postal address, not an IP).

Names are split into words first, whatever their style: `ShipAddress`, `ship_address`,
`shipAddress` and `SHIP_ADDRESS` all read `ship_address`, and patterns match whole words
(`ip` is a word in `last_login_ip`, not in `ship_address` or `zip`). Words written
together in lower case (`homephone`, `birthdate`, `shipaddress`, as unquoted Northwind-
style names fold) are matched by their known endings.

Besides names: types that hold personal data whatever their name (inet, macaddr), binary
columns named like photos or scans (bytea, oid/lo), long free text (notes, comments, bio)
in a table that holds other personal columns (a note about an employee names people), and
a sample of values that look like emails, phone numbers, SSNs or IP addresses.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from dataops.tasks.anonymize.masking import TEXT_TYPES, Column

B, E = r"(?:^|_)", r"(?:$|_)"  # word boundaries in a snake_case name


def words(name: str) -> str:
    """A column name as lower-case words joined by `_`: ShipAddress, shipAddress, ship_address,
    "Ship Address" and SHIP_ADDRESS all give ship_address; IPAddress gives ip_address."""
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)  # IPAddress -> IP_Address
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)  # shipAddress -> ship_Address
    s = re.sub(r"[^A-Za-z0-9]+", "_", s)
    return s.strip("_").lower()


_TEXTUAL = TEXT_TYPES | {"json", "jsonb", "bytea", "xml"}
_NUMERIC = {"int2", "int4", "int8", "numeric"}
_DATES = {"date", "timestamp", "timestamptz"}
BINARY = {"bytea", "oid"}  # oid: a large object's id (the lo extension's type is a domain over it)

# (pattern on words(name), reason, base types that can hold it; None: any). First match wins, so
# the narrow kinds come before the broad ones: ip_address and email_address before postal address.
_HINTS: list[tuple[re.Pattern, str, set[str] | None]] = [(re.compile(p), why, types) for p, why, types in (
    (B + r"(?:ip|ips|ipv4|ipv6|ip_?addr(?:ess)?(?:es)?|ipv[46]_?addr(?:ess)?|mac|mac_?addr(?:ess)?(?:es)?|inet"
     r"|(?:client|remote|last|login|source|src|origin|public|user|host)_?ip|remote_?addr(?:ess)?"
     r"|x_forwarded_for|forwarded_for)" + E,
     "IP/MAC address", _TEXTUAL | _NUMERIC | {"inet", "cidr", "macaddr", "macaddr8"}),
    (r"email|" + B + r"e_mail", "email", _TEXTUAL),
    (r"birth|" + B + r"(?:dob|born(?:_?(?:on|at|date|in))?)" + E, "birth date", _TEXTUAL | _DATES | _NUMERIC),
    (B + r"(?:[a-z]*phone|tel|fax|msisdn|(?:mobile|cell)(?=$)|(?:mobile|cell|contact)_?(?:phone|number|num|no|nr))"
     r"(?:s|_?(?:number|num|no|nr|ext|extension))?" + E, "phone", _TEXTUAL | _NUMERIC),
    (B + r"(?:wallet|bitcoin|btc|eth|crypto)_?addr(?:ess)?(?:es)?" + E, "financial", _TEXTUAL),
    (B + r"(?:web|url|server|bind|listen|host|contract|memory|base|return|hardware|network|net|node|endpoint|smtp"
     r"|proxy|gateway|broadcast|multicast|bus|register)_?addr(?:ess)?(?:es)?" + E, None, None),  # not a place
    (B + r"(?:[a-z]*address(?:es)?|addr|address_?line_?\d*|addr_?\d+|address\d+|street(?:_?(?:name|number|no|address))?"
     r"|[a-z]*street|(?:home|ship|shipping|bill|billing|mail|mailing|delivery|work|current|previous|permanent"
     r"|residence|residential)_?(?:city|town|street|zip|zip_?code|post_?code|postal_?code)"
     r"|city|town|zip\d*|zip_?code|zipcode|post_?code|postal|postal_?code|house_?(?:number|no|nr)"
     r"|apartment|apt|po_?box)" + E,
     "postal address", _TEXTUAL),
    (B + r"(?:first|last|full|given|family|middle|maiden|display|legal|real|user|nick|sur|fore|christian|contact"
     r"|customer|client|ship|shipping|bill|billing|recipient|receiver|sender|employee|patient|owner|card_?holder"
     r"|account_?holder|holder|person|guardian|parent|spouse|partner|emergency_?contact|beneficiary|member|student"
     r"|author|applicant|candidate|passenger|guest|buyer|f|l|m)_?names?" + E
     + r"|" + B + r"name_(?:first|last|full|given|family)" + E, "person name", _TEXTUAL),
    (B + r"(?:ssn|social_?security\w*|national_?(?:id|identity|insurance)\w*|passport\w*|tax_?(?:id|number|no)"
     r"|driver_?s?_?licen[cs]e\w*|licen[cs]e_?(?:number|no)|id_?(?:number|no|card)|identity_?(?:number|no|card|document)"
     r"|nin|nino|nhs_?(?:number|no)|insurance_?(?:number|no)|personnummer|aadhaar)" + E,
     "national id", _TEXTUAL | _NUMERIC),
    (r"password|passwd|passphrase|secret(?!ar)|token|api_?key|access_?key|private_?key|credential|recovery_?code"
     r"|security_?(?:answer|question)|" + B + r"(?:pwd|otp|pin|pin_?code)" + E, "secret", _TEXTUAL),
    (r"iban|credit_?card|routing_?(?:number|no)|sort_?code|" + B + r"(?:bic|swift_?code|cvv2?|cvc|card_?cvc"
     r"|(?:bank_?)?account_?(?:number|no|num|nr)|card_?(?:number|no|num|nr))" + E, "financial", _TEXTUAL | _NUMERIC),
    (r"latitude|longitude|" + B + r"(?:geo|geo_?(?:location|point|loc)|geolocation|lat|lng|lon|lat_?lng|lat_?lon"
     r"|gps\w*|coordinates?|coords?)" + E, "location",
     _TEXTUAL | _NUMERIC | {"float4", "float8", "point", "geometry", "geography"}),
    (r"user_?agent", "user agent", _TEXTUAL),
    (r"gender|ethnic|religio|medical|diagnos|salary|salaries|disabilit|sexual|biometric|allerg"
     r"|" + B + r"health(?:$|_(?:condition|status|record|data|info|issue|notes?|history|problem|insurance)s?)"
     r"|" + B + r"(?:sex|race|income|wages?|political\w*|criminal\w*)" + E, "sensitive personal data", None),
)]
# Binary columns that hold a picture of a person, a scan of a document or a signature.
_PICTURE = re.compile(B + r"(?:[a-z]*(?:photo|avatar|portrait|headshot|selfie|mugshot|signature|image|img|picture"
                          r"|thumbnail)[a-z0-9]*|[a-z]*pics?|faces?|[a-z]*scans?|scanned[a-z0-9]*)" + E)
# Long free text that may tell about a person when the table is about people.
_FREE_TEXT = re.compile(B + r"(?:notes?|comments?|description|bio|biography|remarks?|about|about_me|memo|memos"
                            r"|summary|message|messages|body|details?|observations?|feedback|free_?text|annotations?"
                            r"|narrative|additional_?info\w*|extra_?info|other_?info|history|complaint)" + E)
FREE_TEXT_MIN_LENGTH = 100  # varchar(n) below this holds a label, not a story
# A bare `name` is personal in tables about people, not in `products` or `feature_flags`.
_PEOPLE_TABLES = re.compile(r"user|customer|person|people|member|employee|contact|patient|author|account|profile"
                            r"|client|student|staff|subscriber|applicant|candidate")
_PERSONAL_TYPES = {"inet": "IP address", "cidr": "IP address", "macaddr": "MAC address", "macaddr8": "MAC address"}
# The kinds that make a table about people: its free text may name them. Secrets do not, nor
# pictures alone (product images).
_IDENTIFYING = {"IP/MAC address", "email", "birth date", "birth place", "phone", "postal address", "person name",
                "national id", "financial", "location", "sensitive personal data"}

_CONTENT_HINTS = [
    (re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"), "values look like emails"),
    (re.compile(r"^\d{3}-\d{2}-\d{4}$"), "values look like SSNs"),
    (re.compile(r"^\d{1,3}(\.\d{1,3}){3}$"), "values look like IP addresses"),
    (re.compile(r"^(?=(?:\D*\d){7,15}\D*$)\+?[\d\s().-]{7,}(\s*(x|ext\.?)\s*\d+)?$"), "values look like phone numbers"),
]
CONTENT_SAMPLE = 200


def _kind(table: str, column: str, base_type: str) -> str | None:
    """The kind of personal data a column's name or type says it holds, or None."""
    w = words(column)
    for pattern, why, types in _HINTS:
        if pattern.search(w) and (types is None or base_type in types):
            if why is None:
                return None
            if why == "birth date" and re.search(B + r"(?:place|city|town|country|location)" + E, w):
                return "birth place" if base_type in _TEXTUAL else None
            return why
    if w == "name" and _PEOPLE_TABLES.search(table.lower()) and base_type in _TEXTUAL:
        return "person name"
    if base_type in BINARY and _PICTURE.search(w):
        return "photo"
    if base_type in _PERSONAL_TYPES:
        return base_type
    return None


def name_reason(table: str, column: str, base_type: str) -> str | None:
    """Why a column looks personal from its name or type alone, or None."""
    kind = _kind(table, column, base_type)
    if kind is None:
        return None
    if kind in _PERSONAL_TYPES:
        return f"type {kind} holds {_PERSONAL_TYPES[kind]}es"
    if kind == "photo":
        return f"name suggests a photo, picture or scan ({base_type})"
    return f"name suggests {kind}"


def _long_text(c: Column) -> bool:
    return c.base in TEXT_TYPES and (c.max_length is None or c.max_length >= FREE_TEXT_MIN_LENGTH)


def table_reasons(table: str, columns: list[Column] | tuple[Column, ...], only: set[str] | None = None,
                  kept: set[str] = frozenset()) -> dict[str, str]:
    """Why each column of one table looks personal, by name, type and neighbours: free text
    (notes, comments, bio, ...) is personal when another column of the table is. `only`
    limits the answer to those columns (the ones with no rule); neighbours are all columns,
    masked or not (a masked first_name still makes the table about people), but not those
    with a `keep` rule: someone reviewed them and found nothing personal."""
    kinds = {c.name: _kind(table, c.name, c.base) for c in columns}
    found = {c.name: name_reason(table, c.name, c.base) for c in columns if kinds[c.name]}
    personal = [c.name for c in columns if c.name not in kept
                and (kinds[c.name] in _IDENTIFYING or kinds[c.name] in _PERSONAL_TYPES)]
    for c in columns:
        if c.name in found or not _long_text(c) or not _FREE_TEXT.search(words(c.name)):
            continue
        others = [p for p in personal if p != c.name]
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            found[c.name] = f"free text ({c.type}) in a table with personal columns ({shown}): it may name people"
    return {k: v for k, v in found.items() if only is None or k in only}


def content_reasons(conn: psycopg.Connection, table, columns: list[Column]) -> dict[str, str]:
    """Columns of `table` (a TableInfo) whose sampled values mostly look personal (emails, phones, IPs, SSNs)."""
    text_cols = [c for c in columns if c.base in TEXT_TYPES]
    if not text_cols:
        return {}
    query = sql.SQL("SELECT {} FROM {} LIMIT {}").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in text_cols), table.qualified, sql.Literal(CONTENT_SAMPLE))
    rows = conn.cursor(row_factory=tuple_row).execute(query).fetchall()
    found = {}
    for i, col in enumerate(text_cols):
        values = [r[i].strip() for r in rows if r[i] is not None and r[i].strip()]
        if len(values) < 5:
            continue
        for pattern, why in _CONTENT_HINTS:
            if sum(1 for v in values if pattern.match(v)) * 2 >= len(values):
                found[col.name] = why
                break
    return found
