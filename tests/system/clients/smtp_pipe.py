#!/usr/bin/env python3
"""A real SMTP client, Python's smtplib, talking to `sendmail -bs` over a pipe.

smtplib only speaks to sockets, so the sendmail process gets one end of a socketpair
as its standard input *and* output: exactly what a framework's "sendmail -bs"
transport does with a pair of pipes. No network is involved.

Usage: smtp_pipe.py SENDMAIL_ARGV...   (e.g. smtp_pipe.py /path/sendmail -C cfg -bs)

Sends two messages in one session and prints a JSON report on stdout:
  1. smtplib.sendmail() with a raw message whose headers carry To, Cc and Bcc, the
     envelope naming all three: the server must drop the Bcc header, keep the address;
  2. smtplib.send_message() of an email.message.EmailMessage with UTF-8 text
     (8BITMIME) and a null sender.
"""
import json
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage


class PipeSMTP(smtplib.SMTP):
    """smtplib.SMTP whose "connection" is a sendmail -bs child process."""

    def __init__(self, argv, timeout=30):
        self._argv = argv
        self.proc = None
        super().__init__(timeout=timeout)

    def _get_socket(self, host, port, timeout):
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(self._argv, stdin=theirs, stdout=theirs)
        theirs.close()
        ours.settimeout(timeout)
        return ours


RAW = (
    "From: Web App <app@example.com>\r\n"
    "To: to@example.org\r\n"
    "Cc: cc@example.org\r\n"
    "Bcc: hidden@example.org\r\n"
    "Subject: smtplib over a pipe\r\n"
    "\r\n"
    "first line\r\n"
    ".a line that starts with a dot\r\n"
    "last line\r\n"
)


def main(argv):
    client = PipeSMTP(argv)
    report = {"greeting": None, "replies": []}
    code, msg = client.connect("sendmail-bs")
    report["greeting"] = [code, msg.decode()]
    code, msg = client.ehlo("client.example")
    report["ehlo"] = [code, msg.decode()]
    report["features"] = sorted(client.esmtp_features)
    refused = client.sendmail(
        "app@example.com",
        ["to@example.org", "cc@example.org", "hidden@example.org"],
        RAW.encode(),
    )
    report["refused"] = list(refused)
    report["replies"].append(list(client.noop()))

    m = EmailMessage()
    m["From"] = "Jörg <joerg@example.com>"
    m["To"] = "root"
    m["Subject"] = "Grüße"
    m.set_content("Schöne Grüße\n", cte="8bit")
    refused = client.send_message(m, from_addr="", to_addrs=["root"])
    report["refused"] += list(refused)
    code, msg = client.quit()
    report["quit"] = [code, msg.decode()]
    report["exit"] = client.proc.wait(timeout=30)
    report["replies"] = [[c, m.decode()] for c, m in report["replies"]]
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
