"""A load generator like smtp-source, but every session does STARTTLS (smtp-source has no TLS).

    python bench/_starttls_source.py -s SESSIONS -m MESSAGES -l SIZE -f FROM -t TO HOST:PORT

SESSIONS connections at a time, one message each (as smtp-source without -d):
greeting, EHLO, STARTTLS, the TLS handshake (TLS 1.3, certificate not
checked), EHLO again, MAIL, RCPT, DATA, the message, QUIT. Exits 0 once every
message got its 250, 1 (with the first error on stderr) otherwise. Written on
asyncio: one process, no threads, so that the load side costs little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys


class SmtpError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got = await reply(reader)
    if got != code:
        raise SmtpError(f"{what}: {got}, expected {code}")


def client_context() -> ssl.SSLContext:
    """Made once: loading the system's CA store costs ~30 ms, more than a handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def session(
    host: str, port: int, message: bytes, args: argparse.Namespace, context: ssl.SSLContext
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, 220, "greeting")
        writer.write(b"EHLO load.bench.test\r\n")
        await expect(reader, 250, "EHLO")
        writer.write(b"STARTTLS\r\n")
        await expect(reader, 220, "STARTTLS")
        await writer.start_tls(context)
        writer.write(
            b"EHLO load.bench.test\r\nMAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
            % (args.sender.encode(), args.to.encode())
        )
        await expect(reader, 250, "EHLO after TLS")
        await expect(reader, 250, "MAIL")
        await expect(reader, 250, "RCPT")
        await expect(reader, 354, "DATA")
        writer.write(message)
        await expect(reader, 250, "end of data")
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


async def main(args: argparse.Namespace) -> int:
    host, _, port = args.server.rpartition(":")
    line = b"X" * 78 + b"\r\n"
    body = line * max(1, args.size // len(line))
    message = b"Subject: load\r\n\r\n" + body + b".\r\n"
    left = args.messages
    errors: list[str] = []
    context = client_context()

    async def worker() -> None:
        nonlocal left
        while left > 0 and not errors:
            left -= 1
            try:
                await session(host, int(port), message, args, context)
            except (OSError, SmtpError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(args.sessions)))
    if errors:
        print(errors[0], file=sys.stderr)
        return 1
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-s", dest="sessions", type=int, default=20)
    p.add_argument("-m", dest="messages", type=int, default=1000)
    p.add_argument("-l", dest="size", type=int, default=4096)
    p.add_argument("-f", dest="sender", default="load@bench.test")
    p.add_argument("-t", dest="to", default="sink@bench.test")
    p.add_argument("server", metavar="HOST:PORT")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
