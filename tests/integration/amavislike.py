"""
An amavis-like after-queue content filter, run as a separate process by the
content filter tests (a test tool, not a test module):

    python amavislike.py LISTEN_PORT REINJECT_PORT MODE READY_FILE

It listens for SMTP (or LMTP) on 127.0.0.1:LISTEN_PORT and, as amavis does,
answers the final dot (under LMTP once per recipient) only after it has
reinjected the message (with an ``X-Virus-Scanned:`` header added on top)
into 127.0.0.1:REINJECT_PORT with smtplib, quoting the reinjection's reply in its own:

    250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as ID

MODE: ``pass`` (the above), ``reject`` (554, as amavis for a blocked
message), ``defer`` (451, as amavis when its scanner fails), ``hang`` (never
answers the final dot). It writes READY_FILE once it listens. Every
transaction is appended to READY_FILE + ".log" as one JSON line.
"""

from __future__ import annotations

import json
import smtplib
import socketserver
import sys
import threading

HEADER = b"X-Virus-Scanned: amavislike at example.org\r\n"


class Handler(socketserver.StreamRequestHandler):
    server: Server

    def send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.send("220 localhost ESMTP amavislike")
        sender, rcpts = "", []
        self.lmtp = False
        while True:
            raw = self.rfile.readline(100_000)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "LHLO"):
                self.lmtp = verb == "LHLO"
                self.send("250-localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0")
            elif verb == "HELO":
                self.send("250 localhost")
            elif verb == "MAIL":
                sender, rcpts = line.split(":", 1)[1].split()[0].strip("<>"), []
                self.send("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(line.split(":", 1)[1].strip().strip("<>"))
                self.send("250 2.1.5 Ok")
            elif verb == "DATA":
                self.send("354 End data with <CR><LF>.<CR><LF>")
                self.message(sender, rcpts, self.readData())
                sender, rcpts = "", []
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                return
            else:  # RSET, NOOP
                self.send("250 2.0.0 Ok")

    def readData(self) -> bytes:
        lines = []
        while True:
            raw = self.rfile.readline(1_000_000)
            if raw in (b".\r\n", b""):
                return b"".join(lines)
            lines.append(raw[1:] if raw.startswith(b".") else raw)

    def message(self, sender: str, rcpts: list[str], data: bytes) -> None:
        mode = self.server.mode
        record = {"sender": sender, "rcpts": rcpts, "mode": mode}
        if mode == "hang":
            self.server.log(record)
            threading.Event().wait(3600)
            return
        if mode == "reject":
            reply = "554 5.7.0 Reject, id=00001-01 - SPAM"
        elif mode == "defer":
            reply = "451 4.5.0 Error in processing, id=00001-01, virus_scan FAILED"
        else:
            try:
                with smtplib.SMTP("127.0.0.1", self.server.reinjectPort, timeout=60) as smtp:
                    smtp.ehlo("localhost")
                    smtp.mail(sender)
                    for rcpt in rcpts:
                        smtp.rcpt(rcpt)
                    code, text = smtp.data(HEADER + data)
                reply = (
                    f"250 2.0.0 from MTA(smtp:[127.0.0.1]:{self.server.reinjectPort}): "
                    f"{code} {text.decode()}"
                )
            except (OSError, smtplib.SMTPException) as e:
                reply = f"451 4.5.0 reinjection failed: {type(e).__name__}"
        record["reply"] = reply
        record["lmtp"] = self.lmtp
        self.server.log(record)
        for _ in rcpts if self.lmtp else [None]:
            self.send(reply)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, reinjectPort: int, mode: str, logPath: str) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.reinjectPort, self.mode, self.logPath = reinjectPort, mode, logPath
        self.lock = threading.Lock()

    def log(self, record: dict[str, object]) -> None:
        with self.lock, open(self.logPath, "a") as f:
            f.write(json.dumps(record) + "\n")


def main() -> None:
    port, reinjectPort, mode, ready = sys.argv[1:5]
    server = Server(int(port), int(reinjectPort), mode, ready + ".log")
    with open(ready, "w") as f:
        f.write("ready\n")
    server.serve_forever()


if __name__ == "__main__":
    main()
