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

Where the mail is read from is one function, `collect`: today the incoming spool
that `sendmail` wrote (the daemon that submits to the Exchange Online emulator is not
built yet). Setting RELAY365_CLIENTS_FOLLOW=emulator is where a later step plugs in
reading the emulator's mailbox instead; the expectations stay the same.

Prints nothing and exits 0 when all holds; otherwise prints each mismatch and exits 1.
"""
import email
import email.policy
import json
import os
import sys
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


def collect(case_dir):
    """Every message the case produced, oldest first, as (envelope dict, bytes)."""
    follow = os.environ.get("RELAY365_CLIENTS_FOLLOW", "spool")
    if follow != "spool":
        raise SystemExit(f"RELAY365_CLIENTS_FOLLOW={follow}: only 'spool' exists so far")
    new = os.path.join(case_dir, "spool", "incoming", "new")
    found = [read_incoming(os.path.join(new, n)) for n in sorted(os.listdir(new))]
    found.sort(key=lambda em: em[0]["arrival_us"])
    return found


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
