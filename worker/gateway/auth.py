"""The gateway's producer keys: which tenant a presented key belongs to.

Keys come from ``GATEWAY_API_KEYS`` (``name:key`` pairs; bare keys get a hashed tenant name)
and ``GATEWAY_API_KEYS_FILE`` (``name:sha256-of-key`` lines). The file is read again on SIGHUP
and when it changes (checked at most once a second, on the next request), so a key can be
added, rotated or revoked without a restart. A file that no longer parses is reported and
the keys read last stay in force: a typo must not lock every producer out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from worker.accounting.tenancy import TenantKey, match_tenant, parse_key_spec, parse_keys_file

log = structlog.get_logger(__name__)

#: How often, at most, the keys file's metadata is looked at for a change.
CHECK_EVERY_S = 1.0


class KeysFileError(Exception):
    """The keys file cannot be read or has malformed lines (the message names them)."""


def read_keys_file(path: Path) -> list[TenantKey]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read {path}: {exc.__class__.__name__}") from None
    try:
        return parse_keys_file(content)
    except ValueError as exc:
        raise KeysFileError(f"{path}: {exc}") from None


class KeyRing:
    """The keys in force. ``tenant_of`` is safe to call from one event loop at a time."""

    def __init__(self, specs: list[str], keys_file: Path | None) -> None:
        self._static = [parse_key_spec(spec) for spec in specs]
        self._file = keys_file
        self._file_keys: list[TenantKey] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        if keys_file is not None:
            self._file_keys = read_keys_file(keys_file)  # at start, a bad file is fatal
            self._stamp = self._file_stamp()
        self.keys: list[TenantKey] = [*self._static, *self._file_keys]

    @property
    def tenants(self) -> set[str]:
        return {key.tenant for key in self.keys}

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._file is None:
            return None
        try:
            st = os.stat(self._file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Read the keys file again; False (and the old keys kept) when it is unusable."""
        if self._file is None:
            return True
        self._stamp = self._file_stamp()
        try:
            keys = read_keys_file(self._file)
        except KeysFileError as exc:
            log.error("gateway_keys_file_invalid", problem=str(exc), kept=len(self._file_keys))
            return False
        self._file_keys = keys
        self.keys = [*self._static, *keys]
        log.info("gateway_keys_reloaded", keys=len(self.keys), tenants=len(self.tenants))
        return True

    def maybe_reload(self, now: float | None = None) -> None:
        """Reload when the file changed since it was read (looked at once a second at most)."""
        if self._file is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        if self._file_stamp() != self._stamp:
            self.reload()

    def tenant_of(self, presented: str) -> str | None:
        self.maybe_reload()
        return match_tenant(self.keys, presented)
