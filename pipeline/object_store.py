"""Credentials and endpoints for s3:// sources and stores, from the standard AWS settings (+ ``--s3-endpoint``).

Two libraries talk to S3 here with two spellings of the same settings: fsspec/s3fs (sources, the store's files)
and Lance's object store (the tables). Both are built from one place, ``S3Settings``: the endpoint and region from
the environment (``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``) or ``--s3-endpoint``. Credentials
are never captured: every process (driver or Ray worker) resolves them when it talks to S3, through the standard
chain (environment, ``AWS_PROFILE`` and its config, ``credential_process``, SSO, web identity, instance roles):
s3fs through botocore itself, Lance through :func:`chain_credentials` at each call, so credentials that expire
(``AWS_SESSION_TOKEN`` from a role, refreshed by botocore) are renewed in a multi-day run, and no key travels
inside the plan to the workers. They are never logged, printed, or written into a store.
"""

from __future__ import annotations

import os
import time
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
    # Lance's I/O errors come as ValueError, or as RuntimeError when wrapped ("Commit result ... is unknown: ...")
    return isinstance(exc, (ValueError, RuntimeError)) and "LanceError(IO)" in str(exc).split("\n", 1)[0]


def storage_errors() -> tuple[type[BaseException], ...]:
    """What talking to a store can raise: OSError, and botocore's own errors, which s3fs passes on untranslated
    for a server it cannot reach (``EndpointConnectionError``)."""
    from botocore.exceptions import BotoCoreError

    return OSError, BotoCoreError


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


#: botocore sessions by the environment that shapes their credential chain (a session keeps refreshable credentials).
_SESSIONS: dict[tuple[str | None, ...], Any] = {}
_CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)
#: Every secret this process has resolved, so that messages can be redacted of keys that did not come from the environment.
_SEEN_SECRETS: set[str] = set()


#: How long "the chain found no credentials" is believed: botocore caches credentials it found, not their absence,
#: and a fruitless chain ends in the instance-metadata lookup (a second or more of timeouts off a cloud VM).
NO_CREDENTIALS_RECHECK_S = 60.0
_NONE_UNTIL: dict[tuple[str | None, ...], float] = {}


def chain_credentials() -> tuple[str, str, str | None] | None:
    """(key, secret, token) from the standard credential chain, refreshed by botocore when they near their expiry;
    None when the chain finds none (asked again after ``NO_CREDENTIALS_RECHECK_S``, or at once when the
    environment's credential variables change)."""
    import botocore.session

    state = tuple(os.environ.get(name) for name in _CHAIN_VARIABLES)
    if _NONE_UNTIL.get(state, 0.0) > time.monotonic():
        return None
    if state not in _SESSIONS:
        _SESSIONS[state] = botocore.session.get_session()
    credentials = _SESSIONS[state].get_credentials()
    if credentials is None:
        _NONE_UNTIL[state] = time.monotonic() + NO_CREDENTIALS_RECHECK_S
        return None
    frozen = credentials.get_frozen_credentials()
    _SEEN_SECRETS.update(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)
    return frozen.access_key, frozen.secret_key, frozen.token


def resolved_secrets() -> set[str]:
    """Keys, secrets and tokens this process has resolved through the chain (for redaction)."""
    return set(_SEEN_SECRETS)


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and, only when a caller gives them explicitly, which keys to use (else: the standard chain, resolved
    in each process where it is used); ``repr`` hides the secrets."""

    endpoint: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls, endpoint: str | None = None) -> S3Settings:
        """Endpoint and region from the environment; no credentials (see the module docstring)."""
        env = os.environ
        return cls(
            endpoint=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
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
        """Lance ``storage_options`` for ``uri`` ({} for local paths), with credentials as the chain gives them now."""
        if not is_s3(uri):
            return {}
        options: dict[str, str] = {}
        credentials = (self.key, self.secret, self.token) if self.key and self.secret else chain_credentials()
        if credentials is not None:
            options.update(aws_access_key_id=credentials[0], aws_secret_access_key=credentials[1])
            if credentials[2]:
                options["aws_session_token"] = credentials[2]
        if self.endpoint:
            options["aws_endpoint"] = self.endpoint
            if self.endpoint.startswith("http://"):
                options["allow_http"] = "true"
        if self.region:
            options["aws_region"] = self.region
        elif self.endpoint:  # S3-compatible servers need some region name; AWS buckets find their own
            options["aws_region"] = "us-east-1"
        return options
