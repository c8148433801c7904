"""The settings of SFTP destinations, as routes.yaml gives them."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from gateway.config import ConfigPath, DestinationConfig, Duration, FolderUrl, doc
from gateway.message import Kind


@dataclass(frozen=True, kw_only=True)
class SftpDestinationConfig(DestinationConfig):
    """An SFTP server: each upload is written under a temporary name, flushed, and renamed
    into place."""

    kinds: typing.ClassVar[frozenset[Kind]] = frozenset({Kind.FILE})
    protocol: Literal["sftp"] = "sftp"
    url: FolderUrl = field(
        metadata=doc("sftp://user@host:port/folder/ : files go below the folder by their name")
    )
    key: ConfigPath = field(
        metadata=doc("the private key to log in with (OpenSSH format, no passphrase)")
    )
    known_hosts: ConfigPath = field(
        metadata=doc(
            "an OpenSSH known_hosts file holding the server's key; any other key is refused"
        )
    )
    overwrite: bool = field(
        default=False,
        metadata=doc("replace a file of the same name (else such an upload is a dead letter)"),
    )
    connect_timeout: Duration = field(
        default=Duration(30), metadata=doc("wait to connect and log in", positive=True)
    )
    timeout: Duration = field(
        default=Duration(120), metadata=doc("wait for each answer of the server", positive=True)
    )

    def takes_uploads(self) -> bool:
        return True

    @property
    def port(self) -> int:
        return self.url.port or 22

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.url.scheme != "sftp":
            raise ValueError(f"'url' must be sftp://user@host[:port]/folder/, not {self.url!r}")
        _check_key(str(self.key))
        try:
            with open(str(self.known_hosts), encoding="utf-8") as known:
                known.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read known_hosts {self.known_hosts}: {exc}") from None


def _check_key(path: str) -> None:
    """The key must load as a private key without a passphrase."""
    from twisted.conch.ssh import keys

    loader: typing.Any = keys.Key.fromFile  # conch has no type hints
    try:
        key = loader(path)
    except OSError as exc:
        raise ValueError(f"cannot read the key {path}: {exc.strerror or exc}") from None
    except keys.EncryptedKeyError:
        raise ValueError(
            f"the key {path} has a passphrase: the gateway needs one without"
        ) from None
    except (keys.BadKeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a private key OpenSSH can use: {exc}") from None
    if key.isPublic():
        raise ValueError(f"{path} is a public key: 'key' names the private one")
