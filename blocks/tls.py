"""TLS settings shared by HTTP (``requests``) and the WebSocket (``websocket-client``), and
telling a certificate failure from a network one.

One server setting, ``ca_bundle`` (a PEM file of CA certificates, for a server whose
certificate a private CA signed), is given to both libraries in their own form; ``verify_tls``
False turns verification off for both. Without either, each library keeps its own default
(``requests``: certifi, or ``REQUESTS_CA_BUNDLE``; ``websocket-client``: the system's CAs, or
``WEBSOCKET_CLIENT_CA_BUNDLE``).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Optional, Union

from .errors import CABundleUnusable, CertificateNotTrusted

try:  # urllib3's own hostname check raises this (not an ssl error) when OpenSSL's is not used
    from urllib3.util.ssl_match_hostname import CertificateError as _Urllib3CertificateError
except ImportError:  # pragma: no cover - urllib3 moved it
    _Urllib3CertificateError = ssl.CertificateError


def usable_ca_bundle(path: str, url: str) -> str:
    """``path`` (``~`` expanded) once it is known to be a readable PEM file holding at least one
    certificate, as both libraries need it.

    Raises:
        CABundleUnusable: no such file, a directory, unreadable, or no certificate in it (the
            message names the path and the server ``url``).
    """
    resolved = Path(path).expanduser()
    if resolved.is_dir():
        raise CABundleUnusable(url, path, "it is a directory, not a PEM file")
    if not resolved.is_file():
        raise CABundleUnusable(url, path, "no such file on this machine")
    try:
        ssl.create_default_context(cafile=str(resolved))
    except ssl.SSLError as exc:
        raise CABundleUnusable(url, path, f"no PEM certificate in it ({exc.reason or exc})") from None
    except (OSError, ValueError) as exc:
        raise CABundleUnusable(url, path, getattr(exc, "strerror", None) or str(exc)) from None
    return str(resolved)


def requests_verify(verify_tls: bool, ca_bundle: Optional[str]) -> Union[bool, str]:
    """The ``verify`` argument of ``requests``: False, the CA bundle's path, or True."""
    if not verify_tls:
        return False
    return ca_bundle or True


def websocket_sslopt(verify_tls: bool, ca_bundle: Optional[str]) -> Optional[dict]:
    """The ``sslopt`` of ``websocket.create_connection`` for the same settings (None: its default)."""
    if not verify_tls:
        return {"cert_reqs": ssl.CERT_NONE, "check_hostname": False}
    if ca_bundle:
        return {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": ca_bundle}
    return None


def certificate_error(exc: BaseException) -> Optional[BaseException]:
    """The certificate verification failure behind ``exc`` (however deeply ``requests`` or
    ``urllib3`` wrapped it), or None when ``exc`` is not one (refused, timed out, ...)."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (ssl.SSLCertVerificationError, _Urllib3CertificateError)):
            return item
        todo += [getattr(item, "reason", None), item.__cause__, item.__context__, *item.args]
    return None


def not_trusted(url: str, exc: BaseException, ca_bundle: Optional[str]) -> Optional[CertificateNotTrusted]:
    """A :class:`CertificateNotTrusted` for ``url`` when ``exc`` is a certificate failure, else None."""
    problem = certificate_error(exc)
    if problem is None:
        return None
    reason = getattr(problem, "verify_message", None) or str(problem)
    code = getattr(problem, "verify_code", None)
    if code is None and isinstance(problem, _Urllib3CertificateError):
        code = 62  # urllib3 checked the host name itself: a mismatch
    return CertificateNotTrusted(url, reason.rstrip("."), ca_bundle=ca_bundle, code=code)
