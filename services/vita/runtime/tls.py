"""TLS for gRPC, both ends: a server's certificate (and, for mutual TLS, the CA its clients' certificates must
chain to), and a client's trust root (and its own certificate for mutual TLS). Files are PEM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from vita.errors import VitaError


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise VitaError(f"cannot read the {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ServerTLS:
    """`--tls-cert`/`--tls-key`: serve TLS; with `--tls-client-ca` every client must present a certificate
    signed by that CA (mutual TLS) or the handshake fails."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key, cert = _read(self.key_file, "TLS key"), _read(self.cert_file, "TLS certificate")
        ca = _read(self.client_ca_file, "client CA")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def server_tls(cert: str | None, key: str | None, client_ca: str | None) -> ServerTLS | None:
    """The flags' TLS setting, or None for plaintext; VitaError when they do not make a whole."""
    if cert is None and key is None:
        if client_ca is not None:
            raise VitaError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise VitaError("--tls-cert and --tls-key go together")
    return ServerTLS(cert, key, client_ca)


def channel_credentials(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                        key_file: str | Path | None = None) -> grpc.ChannelCredentials:
    """A client's TLS: trust `ca_file` (default: the system roots); `cert_file` + `key_file` for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise VitaError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA certificate"),
                                        private_key=_read(key_file, "TLS key"),
                                        certificate_chain=_read(cert_file, "TLS certificate"))
