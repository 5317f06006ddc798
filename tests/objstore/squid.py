"""Debian's squid on 127.0.0.1, started by the suite: the egress proxy of a corporate cluster.

The access rules are squid's shipped defaults (`Safe_ports`, `SSL_ports`: CONNECT only to 443),
plus Basic authentication through squid's own `basic_ncsa_auth` helper. `ssl_ports` adds the TLS
ports an administrator would open for a private endpoint; nothing else may be tunnelled.
An `https_port` (squid here is built with GnuTLS, which terminates TLS) serves the same rules
to clients that speak TLS to the proxy.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from .servers import Server, free_port, wait_until

USER, PASSWORD = "agent", "s@cret"  # an '@' in the password: it must be percent-encoded in the URL


def squid_bin() -> str | None:
    return shutil.which("squid") or shutil.which("squid", path="/usr/sbin")


class Squid(Server):
    def __init__(self, tls: tuple[Path, Path] | None = None, ssl_ports: tuple[int, ...] = ()):
        exe = squid_bin()
        if exe is None:
            raise RuntimeError("squid not found: run scripts/install-test-tools.sh")
        # Outside pytest's 0700 temp folders: as root, squid drops to the `proxy` user, which must
        # reach its logs and the password file.
        self.dir = Path(tempfile.mkdtemp(prefix="model-agent-squid-"))
        self.dir.chmod(0o755)
        self.port, self.tls_port = free_port(), free_port()
        self.access_log = self.dir / "access.log"
        (self.dir / "htpasswd").write_text(f"{USER}:{_apr1(PASSWORD)}\n")
        (self.dir / "squid.conf").write_text(self._config(tls, ssl_ports))
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, proxy.pw_uid, proxy.pw_gid)
        self._spawn([exe, "-N", "-f", str(self.dir / "squid.conf")], self.dir)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() is None,
                   30, "squid", self.proc, self.log)

    def _config(self, tls: tuple[Path, Path] | None, ssl_ports: tuple[int, ...]) -> str:
        https = f"https_port 127.0.0.1:{self.tls_port} tls-cert={tls[0]} tls-key={tls[1]}\n" if tls else ""
        return (f"http_port 127.0.0.1:{self.port}\n{https}"
                f"pid_filename {self.dir}/squid.pid\ncache_log {self.dir}/cache.log\n"
                f"access_log stdio:{self.access_log}\ncoredump_dir {self.dir}\n"
                "cache deny all\ncache_mem 8 MB\nshutdown_lifetime 0 seconds\ndns_nameservers 127.0.0.1\n"
                f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {self.dir}/htpasswd\n"
                f"acl SSL_ports port 443 {' '.join(map(str, ssl_ports))}\n"
                "acl Safe_ports port 80 21 443 70 210 1025-65535 280 488 591 777\n"
                "acl CONNECT method CONNECT\nacl authenticated proxy_auth REQUIRED\n"
                "http_access deny !Safe_ports\nhttp_access deny CONNECT !SSL_ports\n"
                "http_access allow authenticated\nhttp_access deny all\n")

    def url(self, *, tls: bool = False, auth: bool = True) -> str:
        cred = f"{USER}:{quote(PASSWORD, safe='')}@" if auth else ""
        return f"https://{cred}127.0.0.1:{self.tls_port}" if tls else f"http://{cred}127.0.0.1:{self.port}"

    def requests(self) -> list[tuple[str, str, str, str]]:
        """(status, method, url, user) of every request squid answered, in order."""
        if not self.access_log.exists():
            return []
        rows = [line.split() for line in self.access_log.read_text().splitlines()]
        return [(r[3], r[5], r[6], r[7]) for r in rows if len(r) >= 8]

    def forget(self) -> None:
        """Empty the access log (squid keeps its file open and appends)."""
        if self.access_log.exists():
            os.truncate(self.access_log, 0)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _apr1(password: str) -> str:
    """An htpasswd (Apache MD5) hash, as `htpasswd` writes it; basic_ncsa_auth reads that format."""
    return subprocess.run(["openssl", "passwd", "-apr1", password], capture_output=True, text=True,
                          check=True).stdout.strip()
