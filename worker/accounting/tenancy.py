"""Tenants and their keys (pure): who a producer key belongs to.

A tenant is a team: its jobs' ids are ``<tenant>/<job_id>``, its limits and quotas are its
own, and the gateway shows it only its own jobs and batches. The gateway learns the tenant
from the caller's key:

* ``LLM_WORKER_GATEWAY_API_KEYS``: comma-separated ``name:key`` pairs; a bare ``key`` still
  works, its tenant named ``key-`` and the first 8 hex digits of the key's sha256;
* ``LLM_WORKER_GATEWAY_API_KEYS_FILE``: one ``name:sha256-of-key`` per line (``#`` comments
  and blank lines allowed), so the secret itself need not sit in the configuration.

Keys are held as sha256 digests only, and a presented key is compared with every one of them
in constant time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A tenant's name: it prefixes its jobs' ids (``<tenant>/<job_id>``), so it holds no ``/``
#: (nor ``:``, which separates it from its key).
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}\Z")
#: Characters a key may hold: printable ASCII without spaces or commas (the list separator).
_KEY = re.compile(r"^[\x21-\x2b\x2d-\x7e]{8,512}\Z")
MIN_KEY_CHARS = 8


def valid_tenant(tenant: Any) -> bool:
    return isinstance(tenant, str) and bool(TENANT_PATTERN.match(tenant))


def split_qualified_id(job_id: str) -> tuple[str | None, str]:
    """``(tenant, job_id)`` of a stored id (``<tenant>/<job_id>``, or a plain id)."""
    tenant, sep, rest = job_id.partition("/")
    return (tenant, rest) if sep else (None, job_id)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bare_key_tenant(key: str) -> str:
    """The tenant of a key given without a name: stable, and says nothing usable of the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class TenantKey:
    """One producer key: its tenant and the sha256 digest of the key."""

    tenant: str
    digest: bytes

    def __repr__(self) -> str:  # the digest is not the key, but need not be shown either
        return f"TenantKey(tenant={self.tenant!r})"


def key_spec_problem(spec: str) -> str | None:
    """Why a ``GATEWAY_API_KEYS`` entry is malformed (without repeating it), or None."""
    name, sep, key = spec.partition(":")
    if not sep:
        name, key = "", spec
    if sep and not valid_tenant(name):
        return "the name before ':' must be 1-64 of letters, digits, '_', '.' or '-'"
    if not _KEY.match(key):
        return f"the key must be {MIN_KEY_CHARS}-512 printable characters without spaces or commas"
    return None


def parse_key_spec(spec: str) -> TenantKey:
    """``name:key`` or a bare ``key`` as a :class:`TenantKey`; ValueError when malformed."""
    problem = key_spec_problem(spec)
    if problem:
        raise ValueError(problem)
    name, sep, key = spec.partition(":")
    if not sep:
        return TenantKey(bare_key_tenant(spec), key_digest(spec))
    return TenantKey(name, key_digest(key))


def parse_keys_file(content: str) -> list[TenantKey]:
    """The lines of a keys file (``name:sha256-hex``); ValueError naming every bad line by
    number (never repeating its text, which may be a key pasted by mistake)."""
    keys: list[TenantKey] = []
    problems: list[str] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, digest = line.partition(":")
        name, digest = name.strip(), digest.strip()
        if not sep or not valid_tenant(name):
            problems.append(
                f"line {number}: expected name:sha256-of-key, name 1-64 of A-Z a-z 0-9 _ . -"
            )
        elif not _SHA256_HEX.match(digest):
            problems.append(f"line {number}: the part after ':' must be 64 hex digits (sha256)")
        else:
            keys.append(TenantKey(name, bytes.fromhex(digest)))
    if problems:
        raise ValueError("; ".join(problems))
    return keys


def match_tenant(keys: Iterable[TenantKey], presented: str) -> str | None:
    """The tenant whose key was presented, or None. Every key is compared, always, in
    constant time: the time taken says nothing about which matched, or how much of one."""
    if not presented:
        return None
    digest = key_digest(presented)
    found: str | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest) and found is None:
            found = key.tenant
    return found


def configured_tenants(
    key_specs: Iterable[str], quota_names: Iterable[str], keys_file: Path | None
) -> set[str]:
    """The tenants the configuration names (metric label values: a bounded set): the
    gateway's keys, the keys file when it is readable here, and the quotas' overrides."""
    names = {parse_key_spec(spec).tenant for spec in key_specs if key_spec_problem(spec) is None}
    names.update(name for name in quota_names if name != "default" and valid_tenant(name))
    if keys_file is not None:
        # The gateway reports a bad keys file; here it only names label values.
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError):
            names.update(key.tenant for key in parse_keys_file(keys_file.read_text("utf-8")))
    return names
