#!/usr/bin/env python3
"""Checks what one client's mail became: envelope, headers, subject, body bytes, encoding.

Usage: check.py CASE_DIR EXPECTATIONS_JSON

CASE_DIR is the case's private installation (made by `run`): its spool, and the argv
log its sendmail wrapper wrote. EXPECTATIONS_JSON is an object; every key is optional:

  count        number of messages (default 1); the other keys apply to each
  messages     instead of the keys below: a list of expectations, one per message
  sender       envelope sender ("" for the null sender)
  recipients   envelope recipients, as a set
  hidden       addresses that must be in the envelope but in no header (Bcc)
  subject      the Subject, after RFC 2047 decoding
  from         substring of the From header (decoded)
  headers      {name: substring} each header must contain (raw, undecoded)
  body         the body after transfer decoding, as text (exact)
  body_contains  list of substrings of the decoded body
  body_raw     the body bytes exactly as stored (CRLF), as a string
  charset      Content-Type charset (case-insensitive)
  cte          Content-Transfer-Encoding (case-insensitive); "none" for absent
  argv         list: the exact arguments the client passed to sendmail (one call)
  argv_prefix  list: the arguments must start with these

Where the mail is read from is one function, `collect`. With
RELAY365_CLIENTS_FOLLOW=emulator (what `run` sets by default) the case's queued mail
is delivered by `relay365 flush` over STARTTLS and AUTH LOGIN to a private Exchange
Online emulator, and what the server received is checked: its recipients are the
envelope, its bytes the message (the account keeps From as written, `from =
"preserve"`, so the bytes are the client's; the envelope sender on the wire is always
the mailbox, and the `sender` expectation is checked against the queued envelope).
With RELAY365_CLIENTS_FOLLOW=spool only the queued files are checked.

Prints nothing and exits 0 when all holds; otherwise prints each mismatch and exits 1.
"""
import email
import email.policy
import json
import os
import pwd
import subprocess
import sys
import time
from email.header import decode_header, make_header

MAGIC = b"RELAY365 1\n"


def read_incoming(path):
    """Parses one incoming file: magic line, JSON envelope line, message."""
    data = open(path, "rb").read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a relay365 incoming file")
    rest = data[len(MAGIC):]
    nl = rest.index(b"\n")
    env = json.loads(rest[:nl])
    msg = rest[nl + 1:]
    if len(msg) != env["size"]:
        raise ValueError(f"{path}: envelope size {env['size']} but {len(msg)} bytes follow")
    return env, msg


MAILBOX = "app@contoso.com"
ADMIN = "admin@example.org"
DOMAIN = "example.com"


def is_local_user(address):
    local, _, domain = address.rpartition("@")
    if domain != DOMAIN:
        return False
    try:
        pwd.getpwnam(local)
        return True
    except KeyError:
        return False

PASSWORD = "client-suite-password"


def message_id(raw):
    head = raw.partition(b"\r\n\r\n")[0]
    values = header_values(head, "Message-ID")
    return values[0] if values else None


def follow_to_emulator(case_dir, queued):
    """Delivers the case's queue to a private emulator; returns what it received,
    each with the envelope sender that was queued (matched by Message-ID)."""
    bindir = os.environ["RELAY365_BIN_DIR"]
    emu_dir = os.path.join(case_dir, "emulator")
    emu = subprocess.Popen(
        [os.path.join(bindir, "relay365-emulator"), "--dir", emu_dir,
         "--mailbox", f"{MAILBOX}:{PASSWORD}", "--no-send-as-check"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(emu_dir, "smtp.port")
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        port = open(port_file).read().strip()
        secrets = os.path.join(case_dir, "secrets.toml")
        with open(secrets, "w") as f:
            f.write(f'[app]\npassword = "{PASSWORD}"\n')
        os.chmod(secrets, 0o600)
        config = os.path.join(case_dir, "relay365.toml")
        with open(config, "a") as f:
            f.write(f'secrets_file = "{secrets}"\nadmin = "{ADMIN}"\naliases = "/dev/null"\n'
                    f'\n[[account]]\nname = "app"\n'
                    f'mailbox = "{MAILBOX}"\nhost = "localhost"\nport = {port}\n'
                    f'auth = "login"\nfrom = "preserve"\n'
                    f'ca_file = "{os.path.join(emu_dir, "ca.pem")}"\n')
        flush = subprocess.run([os.path.join(bindir, "relay365"), "--config", config, "flush"],
                               capture_output=True, text=True)
        if flush.returncode != 0:
            raise SystemExit(f"relay365 flush failed: {flush.stderr}")
        by_id = {message_id(raw): env for env, raw in queued}
        found = []
        msgs = os.path.join(emu_dir, "messages")
        for name in sorted(n for n in os.listdir(msgs) if n.endswith(".json")):
            meta = json.load(open(os.path.join(msgs, name)))
            raw = open(os.path.join(msgs, name[:-5] + ".eml"), "rb").read()
            if meta["mail_from"] != MAILBOX:
                raise SystemExit(f"MAIL FROM {meta['mail_from']!r}, want the mailbox")
            env = by_id.get(message_id(raw))
            if env is None:
                raise SystemExit(f"the server received a message that was never queued: {meta}")
            # Local users (root@<domain>) reach the admin address, as relay365 routes them.
            want = []
            for r in env["recipients"]:
                r = ADMIN if is_local_user(r) else r
                if r not in want:
                    want.append(r)
            if sorted(meta["rcpts"]) != sorted(want):
                raise SystemExit(f"the server got RCPT {meta['rcpts']}, want {want}")
            found.append((env, raw))
        return found
    finally:
        emu.terminate()
        emu.wait()


def collect(case_dir):
    """Every message the case produced, oldest first, as (envelope dict, bytes)."""
    follow = os.environ.get("RELAY365_CLIENTS_FOLLOW", "spool")
    new = os.path.join(case_dir, "spool", "incoming", "new")
    found = [read_incoming(os.path.join(new, n)) for n in sorted(os.listdir(new))]
    found.sort(key=lambda em: em[0]["arrival_us"])
    if follow == "spool":
        return found
    if follow == "emulator":
        return follow_to_emulator(case_dir, found)
    raise SystemExit(f"RELAY365_CLIENTS_FOLLOW={follow}: use spool or emulator")


def argv_calls(case_dir):
    """The argument lists the wrapper recorded, one per sendmail call."""
    calls = []
    d = os.path.join(case_dir, "argv")
    if not os.path.isdir(d):
        return calls
    for name in sorted(os.listdir(d)):
        raw = open(os.path.join(d, name), "rb").read()
        calls.append([a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]])
    return calls


def header_values(head, name):
    """Every value of header `name` in the raw header block, unfolded and decoded:
    raw UTF-8 (as PHP writes it) and RFC 2047 encoded words both become text."""
    values = []
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if not line.lower().startswith(name.lower().encode() + b":"):
            continue
        value = line[len(name) + 1:]
        for cont in lines[i + 1:]:
            if not cont[:1] in (b" ", b"\t"):
                break
            value += cont
        text = value.decode("utf-8", "replace").strip()
        if "=?" in text:
            text = str(make_header(decode_header(text)))
        values.append(text)
    return values


def first(head, name):
    v = header_values(head, name)
    return v[0] if v else None


def check_message(env, raw, exp, errors, n):
    where = f"message {n}"
    if "sender" in exp and env["sender"] != exp["sender"]:
        errors.append(f"{where}: sender {env['sender']!r}, want {exp['sender']!r}")
    if "recipients" in exp and sorted(env["recipients"]) != sorted(exp["recipients"]):
        errors.append(f"{where}: recipients {env['recipients']}, want {exp['recipients']}")
    head, sep, body_raw = raw.partition(b"\r\n\r\n")
    if not sep:
        head, body_raw = raw, b""
    if b"\n" in raw.replace(b"\r\n", b""):
        errors.append(f"{where}: bare LF stored")
    for h in exp.get("hidden", []):
        if h not in env["recipients"]:
            errors.append(f"{where}: hidden recipient {h} not in the envelope")
        if h.encode() in head:
            errors.append(f"{where}: hidden recipient {h} visible in the headers")
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if header_values(head, "Bcc") or header_values(head, "Resent-Bcc"):
        errors.append(f"{where}: a Bcc header was kept")
    for name in ("Date", "Message-ID", "From"):
        if len(header_values(head, name)) != 1:
            errors.append(f"{where}: {len(header_values(head, name))} {name} headers, want 1")
    if "subject" in exp and first(head, "Subject") != exp["subject"]:
        errors.append(f"{where}: subject {first(head, 'Subject')!r}, want {exp['subject']!r}")
    if "from" in exp and exp["from"] not in (first(head, "From") or ""):
        errors.append(f"{where}: From {first(head, 'From')!r} lacks {exp['from']!r}")
    for name, want in exp.get("headers", {}).items():
        got = header_values(head, name)
        if not any(want in v for v in got):
            errors.append(f"{where}: header {name} {got!r} lacks {want!r}")
    if "charset" in exp:
        cs = msg.get_content_charset()
        if (cs or "").lower() != exp["charset"].lower():
            errors.append(f"{where}: charset {cs!r}, want {exp['charset']!r}")
    if "cte" in exp:
        cte = (msg.get("Content-Transfer-Encoding") or "none").strip().lower()
        if cte != exp["cte"].lower():
            errors.append(f"{where}: Content-Transfer-Encoding {cte!r}, want {exp['cte']!r}")
    if "body_raw" in exp and body_raw != exp["body_raw"].encode():
        errors.append(f"{where}: body bytes {body_raw!r}, want {exp['body_raw'].encode()!r}")
    if "body" in exp or "body_contains" in exp:
        part = msg
        if msg.is_multipart():
            part = next((p for p in msg.walk() if p.get_content_type() == "text/plain"), msg)
        payload = part.get_payload(decode=True) or b""
        text = payload.decode(part.get_content_charset() or "utf-8", "replace")
        text = text.replace("\r\n", "\n")
        if "body" in exp and text != exp["body"]:
            errors.append(f"{where}: body {text!r}, want {exp['body']!r}")
        for s in exp.get("body_contains", []):
            if s not in text:
                errors.append(f"{where}: body lacks {s!r}: {text[:300]!r}")


def main(case_dir, expectations):
    exp = json.loads(expectations)
    errors = []
    messages = collect(case_dir)
    want = len(exp["messages"]) if "messages" in exp else exp.get("count", 1)
    if len(messages) != want:
        errors.append(f"{len(messages)} message(s) queued, want {want}")
    per_message = exp.get("messages")
    if per_message is not None and len(per_message) != len(messages):
        errors.append(f"{len(messages)} message(s) queued, want {len(per_message)}")
    for n, (env, raw) in enumerate(messages, 1):
        mine = per_message[n - 1] if per_message and n <= len(per_message) else exp
        check_message(env, raw, mine, errors, n)
    calls = argv_calls(case_dir)
    if "argv" in exp and calls != [exp["argv"]]:
        errors.append(f"sendmail argv {calls}, want [{exp['argv']}]")
    if "argv_prefix" in exp:
        p = exp["argv_prefix"]
        if not calls or any(c[: len(p)] != p for c in calls):
            errors.append(f"sendmail argv {calls}, want each to start with {p}")
    for e in errors:
        print(f"    {e}")
    if errors and messages:
        print("    --- first message ---")
        print("    " + messages[0][1].decode("utf-8", "replace").replace("\n", "\n    ")[:3000])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
