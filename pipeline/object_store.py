"""Credentials and endpoints for s3:// sources and stores, from the standard AWS settings (+ ``--s3-endpoint``).

Two libraries talk to S3 here with two spellings of the same settings: fsspec/s3fs (sources, the store's card
files) and Lance's object store (the tables). Both are built from one place: the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``)
and an explicit endpoint for S3-compatible servers. With no keys in the environment, both libraries fall back to
their own credential chains (profiles, instance roles). These options are passed around in memory only: they are
never logged, printed, or written into a store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


#: What to do when a server refuses our requests (HTTP 403: wrong secret, unknown key, no permission).
ACCESS_HINT = "check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and that they may use this bucket"

#: What to do when an S3 server cannot be reached.
ENDPOINT_HINT = "check the endpoint (--s3-endpoint, or AWS_ENDPOINT_URL) and that the server is up"


#: S3 error codes of a server refusing the caller (any S3-compatible server uses these names; some omit the status).
REFUSED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403 Forbidden")


def access_refused(exc: BaseException) -> bool:
    """Whether a storage error is the server refusing our credentials (s3fs: PermissionError; Lance and botocore: a
    403 or one of the S3 error codes that mean it, in the text)."""
    return isinstance(exc, PermissionError) or any(code in str(exc) for code in REFUSED_CODES)


def storage_failed(exc: BaseException) -> bool:
    """Whether an error is the storage failing (worth a rerun), not bad input: an OSError, or the ValueError
    Lance raises for its I/O errors (``LanceError(IO): ...``: server down, connection reset), also when it reaches
    us through Arrow's reader (``ArrowInvalid: External error: LanceError(IO): ...``, e.g. from a scan)."""
    if isinstance(exc, OSError) or any(c.__name__ == "BotoCoreError" for c in type(exc).__mro__):
        return True  # botocore's own errors (EndpointConnectionError: server down) reach us through s3fs untranslated
    return isinstance(exc, ValueError) and "LanceError(IO)" in str(exc).split("\n", 1)[0]


def storage_errors() -> tuple[type[BaseException], ...]:
    """What talking to a store can raise: OSError, and botocore's own errors, which s3fs passes on untranslated
    for a server it cannot reach (``EndpointConnectionError``)."""
    from botocore.exceptions import BotoCoreError

    return OSError, BotoCoreError


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 settings; ``repr`` hides the secrets."""

    endpoint: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls, endpoint: str | None = None) -> S3Settings:
        env = os.environ
        return cls(
            endpoint=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            key=env.get("AWS_ACCESS_KEY_ID"),
            secret=env.get("AWS_SECRET_ACCESS_KEY"),
            token=env.get("AWS_SESSION_TOKEN"),
        )

    def fsspec_options(self, uri: str) -> dict[str, Any]:
        """s3fs keyword arguments for ``uri`` ({} for local paths)."""
        if not is_s3(uri):
            return {}
        options: dict[str, Any] = {}
        if self.key and self.secret:
            options.update(key=self.key, secret=self.secret)
            if self.token:
                options["token"] = self.token
        client: dict[str, Any] = {}
        if self.endpoint:
            client["endpoint_url"] = self.endpoint
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        return options

    def lance_options(self, uri: str) -> dict[str, str]:
        """Lance ``storage_options`` for ``uri`` ({} for local paths)."""
        if not is_s3(uri):
            return {}
        options: dict[str, str] = {}
        if self.key and self.secret:
            options.update(aws_access_key_id=self.key, aws_secret_access_key=self.secret)
            if self.token:
                options["aws_session_token"] = self.token
        if self.endpoint:
            options["aws_endpoint"] = self.endpoint
            if self.endpoint.startswith("http://"):
                options["allow_http"] = "true"
        if self.region:
            options["aws_region"] = self.region
        elif self.endpoint:  # S3-compatible servers need some region name; AWS buckets find their own
            options["aws_region"] = "us-east-1"
        return options
