"""Redis URLs, free of I/O: kombu's Sentinel form, ``sentinel://host:port;sentinel://host:port``
(optionally ``/db``), parsed and checked, so that a bad one fails at settings load."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://h:p;sentinel://h:p/db`` URL."""

    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # in the URL: the master's (kombu)

    def normalised(self) -> str:
        """The URL with the database (and credentials, if any) on every part: kombu reads
        both from the first part only."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(
            f"{SENTINEL_SCHEME}://{auth}{_host_text(host)}:{port}/{self.db}"
            for host, port in self.hosts
        )


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def mask_credentials(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _CREDENTIALS.sub(r"\1***@", text)


_CREDENTIALS = re.compile(r"(://[^:/@;\s]*:)[^@/;\s]*@")


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse kombu's Sentinel form; a malformed one raises :class:`ValueError` saying why."""
    parts = [part.strip() for part in url.strip().split(";")]
    if not parts or any(not part for part in parts):
        raise ValueError(
            "has an empty entry; expected sentinel://host:port;sentinel://host:port (';' "
            "between Sentinels, none at the end)"
        )
    hosts: list[tuple[str, int]] = []
    dbs: set[int] = set()
    username = password = None
    for part in parts:
        shown = part.split("@")[-1]  # never echo credentials
        if not part.lower().startswith(f"{SENTINEL_SCHEME}://"):
            raise ValueError(
                f"entry {shown[:60]!r} is not a Sentinel address; every entry must be "
                "sentinel://host:port (kombu's form)"
            )
        try:
            split = urlsplit(part)
            port = split.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"entry {shown[:60]!r} has a port that is not a number") from None
        if not split.hostname:
            raise ValueError(f"entry {shown[:60]!r} names no host")
        if split.query or split.fragment:
            raise ValueError(
                f"entry {shown[:60]!r} has a query or fragment; Sentinel options are settings "
                "(REDIS_SENTINEL_MASTER, REDIS_SENTINEL_PASSWORD, REDIS_PASSWORD)"
            )
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"entry {shown[:60]!r}: the database must be a number")
            dbs.add(int(path))
        if split.password is not None:
            password = unquote(split.password)
            username = unquote(split.username) if split.username else None
        hosts.append((split.hostname, port))
    if len(dbs) > 1:
        raise ValueError(f"names different databases ({sorted(dbs)}); name one, or none (0)")
    return SentinelUrl(tuple(hosts), dbs.pop() if dbs else 0, username, password)
