"""Destination credentials at rest: a Fernet token of a JSON object, with the key from
TOUCHPOINT_EXPORT_SECRET_KEY. Values are decrypted only to build a destination and are never
logged or answered."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from cryptography.fernet import Fernet, InvalidToken

from services.export.destinations.base import Secrets


class CredentialsError(Exception):
    """Credentials cannot be stored or read (no key, or a key that does not open them)."""


class SecretBox:
    def __init__(self, key: str | None) -> None:
        self._fernet: Fernet | None = None
        if key:
            try:
                self._fernet = Fernet(key.encode())
            except (ValueError, TypeError) as exc:
                raise CredentialsError(
                    "TOUCHPOINT_EXPORT_SECRET_KEY is not a Fernet key (32 url-safe base64-encoded bytes)"
                ) from exc

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode()

    @property
    def can_store(self) -> bool:
        return self._fernet is not None

    def seal(self, values: Mapping[str, str]) -> bytes:
        if self._fernet is None:
            raise CredentialsError(
                "storing credentials needs TOUCHPOINT_EXPORT_SECRET_KEY; or use credential_env"
            )
        return self._fernet.encrypt(orjson.dumps(dict(values)))

    def open(self, token: bytes | None) -> dict[str, str]:
        if not token:
            return {}
        if self._fernet is None:
            raise CredentialsError("stored credentials need TOUCHPOINT_EXPORT_SECRET_KEY to be read")
        try:
            values = orjson.loads(self._fernet.decrypt(bytes(token)))
        except InvalidToken as exc:
            raise CredentialsError(
                "TOUCHPOINT_EXPORT_SECRET_KEY does not open the stored credentials"
            ) from exc
        return {str(k): str(v) for k, v in values.items()}

    def secrets(self, token: bytes | None, env: Mapping[str, str]) -> Secrets:
        return Secrets(self.open(token), env)
