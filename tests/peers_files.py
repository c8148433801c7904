"""OpenSSH's sshd (SFTP) and vsftpd (FTP) as real file servers for the tests, on loopback.

Each instance runs as its own private daemon: its own configuration, keys,
pid file and log in its folder, a port of its own on 127.0.0.1, and a system
user made for it.  Both need root (they log users in and chroot them), as CI
runs.  Uploads land in ``incoming`` (``self.incoming``), which the user may
write and nothing above it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.peers import _end_process, _tail, free_port, make_tls_cert, require_binary, wait_until


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(
            f"{what} needs root (it logs system users in and chroots them); CI runs as root."
            " Run the tests as root.",
            pytrace=False,
        )


def _system_user(name: str, home: str, password: str | None) -> pwd.struct_passwd:
    """A system user that cannot log in to a shell; made once, kept for later runs (its home
    set to ``home`` each time: vsftpd enters it before its local_root)."""
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        pass
    else:
        if user.pw_dir != home:
            subprocess.run(["usermod", "-d", home, name], check=True, capture_output=True)
        return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--home-dir", home, "--no-create-home", "--shell",
         "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    if password is None:
        # Locked ("!") would be refused even for a key: no password at all instead.
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    else:
        subprocess.run(["chpasswd"], input=f"{name}:{password}".encode(), check=True)
    return pwd.getpwnam(name)


def _ssh_keygen(path: Path) -> None:
    if not path.exists():
        subprocess.run(
            [require_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
            check=True,
            capture_output=True,
        )


class Sshd:
    """An sshd that serves SFTP only (internal-sftp, chrooted) to the user ``sftptest``, who
    logs in with ``self.client_key``; ``self.known_hosts`` holds its host key."""

    USER = "sftptest"

    def __init__(self, directory: Path) -> None:
        _require_root("sshd")
        self.directory = directory.resolve()
        self.port = free_port()
        # sshd refuses a chroot with a component that is not root's or is group/world
        # writable: /tmp (1777) cannot be on the way, so it lives under /srv.
        self.root = Path(f"/srv/gateway-test-sftp-{self.port}")
        self.incoming = self.root / "incoming"
        self.keys = Path(f"/srv/gateway-test-sftp-{self.port}.keys")
        self.client_key = self.directory / "id_ed25519"
        self.host_key = self.directory / "ssh_host_ed25519_key"
        self.known_hosts = self.directory / "known_hosts"
        self.config_path = self.directory / "sshd_config"
        self.log_path = self.directory / "sshd.log"
        self.pid_path = self.directory / "sshd.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    def _prepare(self) -> None:
        user = _system_user(self.USER, "/", None)
        # sshd reads authorized_keys as the user, who cannot pass pytest's private tmp folder.
        keys = self.keys
        keys.mkdir(parents=True, exist_ok=True)
        keys.chmod(0o755)
        self.directory.mkdir(parents=True, exist_ok=True)
        _ssh_keygen(self.host_key)
        _ssh_keygen(self.client_key)
        shutil.copy(f"{self.client_key}.pub", keys / self.USER)
        (keys / self.USER).chmod(0o644)
        host = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host}\n127.0.0.1 {host}\n")
        self.incoming.mkdir(parents=True, exist_ok=True)
        os.chown(self.root, 0, 0)
        self.root.chmod(0o755)
        os.chown(self.incoming, user.pw_uid, user.pw_gid)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.config_path.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.pid_path}\nLogLevel VERBOSE\nUsePAM no\nPermitRootLogin no\n"
            f"AllowUsers {self.USER}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nAuthenticationMethods publickey\n"
            f"AuthorizedKeysFile {keys}/%u\nStrictModes no\nUseDNS no\n"
            "MaxStartups 200:30:400\nMaxSessions 64\nSubsystem sftp internal-sftp\n"
            f"ChrootDirectory {self.root}\nForceCommand internal-sftp -d / -l INFO\n"
        )

    def start(self, timeout: float = 15.0) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"sshd is already running on port {self.port}")
        self._prepare()
        sshd = require_binary("sshd")  # started by its absolute path: it re-executes itself
        check = subprocess.run([sshd, "-t", "-f", str(self.config_path)], capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejects its configuration: {check.stderr.decode()}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(self.answers, f"sshd on port {self.port} to serve SFTP", timeout=timeout)
        return self

    def sftp(self, *commands: str) -> subprocess.CompletedProcess[str]:
        """Run ``commands`` in OpenSSH's sftp client as the test user."""
        return subprocess.run(
            [require_binary("sftp"), "-b", "-", "-i", str(self.client_key), "-P", str(self.port),
             "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
             f"{self.USER}@127.0.0.1"],
            input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def answers(self) -> bool | None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"sshd exited:\n{_tail(self.log_path)}")
        return self.sftp("pwd").returncode == 0 or None

    def stop(self) -> None:
        if self.proc is not None:
            _end_process(self.proc, 10)
            self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.keys, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


class Vsftpd:
    """A vsftpd for the user ``ftptest`` (password ``self.password``), chrooted to
    ``self.root`` with uploads in ``incoming``; AUTH TLS offered, not required."""

    USER = "ftptest"
    PASSWORD = "ftptest-pw"

    def __init__(self, directory: Path, *, ssl_reuse: bool = False) -> None:
        _require_root("vsftpd")
        self.ssl_reuse = ssl_reuse  # require_ssl_reuse: data connections resume the session
        self.directory = directory.resolve()
        self.port = free_port()
        self.root = self.directory / "root"
        self.incoming = self.root / "incoming"
        self.config_path = self.directory / "vsftpd.conf"
        self.log_path = self.directory / "vsftpd.log"
        self.stdout_path = self.directory / "stdout.log"
        low = 32000 + (self.port % 100) * 100
        self.passive_ports = (low, low + 99)
        self.proc: subprocess.Popen[bytes] | None = None

    def _prepare(self) -> None:
        user = _system_user(self.USER, str(self.root), self.PASSWORD)
        # A private PAM service: Debian's /etc/pam.d/vsftpd wants a shell from /etc/shells.
        pam = Path("/etc/pam.d/vsftpd-gateway-test")
        if not pam.exists():
            pam.write_text(
                "auth     required pam_unix.so\naccount  required pam_unix.so\n"
                "session  required pam_permit.so\n"
            )
        Path("/var/run/vsftpd/empty").mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        # vsftpd refuses a chroot its user can write to: root owns it, incoming is the user's.
        for folder in (self.directory, self.root):
            os.chown(folder, 0, 0)
            folder.chmod(0o755)
        with contextlib.suppress(OSError):  # tmp_path's parents must be passable
            for parent in self.directory.parents:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o005)
        os.chown(self.incoming, user.pw_uid, user.pw_gid)
        cert, key = make_tls_cert(self.directory / "tls")
        self.cert = cert
        low, high = self.passive_ports
        self.config_path.write_text(
            "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.1\n"
            f"listen_port={self.port}\nbackground=NO\nanonymous_enable=NO\nlocal_enable=YES\n"
            f"write_enable=YES\nlocal_umask=022\nlocal_root={self.root}\nchroot_local_user=YES\n"
            "secure_chroot_dir=/var/run/vsftpd/empty\npam_service_name=vsftpd-gateway-test\n"
            f"seccomp_sandbox=NO\npasv_min_port={low}\npasv_max_port={high}\n"
            "connect_from_port_20=NO\nmax_clients=0\nmax_per_ip=0\nlog_ftp_protocol=YES\n"
            "xferlog_enable=YES\nxferlog_std_format=NO\n"
            f"vsftpd_log_file={self.log_path}\nssl_enable=YES\nrsa_cert_file={cert}\n"
            f"rsa_private_key_file={key}\nforce_local_logins_ssl=NO\n"
            f"force_local_data_ssl=NO\nrequire_ssl_reuse={'YES' if self.ssl_reuse else 'NO'}\n"
            "ssl_ciphers=HIGH\n"
        )
        self.config_path.chmod(0o600)

    def start(self, timeout: float = 15.0) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"vsftpd is already running on port {self.port}")
        self._prepare()
        with self.stdout_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [require_binary("vsftpd"), str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(self.answers, f"vsftpd on port {self.port} to log in", timeout=timeout)
        return self

    def url(self, path: str = "") -> str:
        return f"ftp://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{path}"

    def answers(self) -> bool | None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"vsftpd exited:\n{_tail(self.stdout_path)}")
        done = subprocess.run(
            [require_binary("curl"), "-sS", "--max-time", "5", "-o", "/dev/null",
             self.url("incoming/")],
            capture_output=True,
        )  # fmt: skip
        return done.returncode == 0 or None

    def stop(self) -> None:
        if self.proc is not None:
            _end_process(self.proc, 10)
            self.proc = None
            time.sleep(0.1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
