"""Case `listen` of bench/run: relay365's network listener (`relay365 listen`) against
Postfix's smtpd (a private instance, the same one the other cases use, given an SMTP
listener on a free loopback port), both loaded with Postfix's own load generator
`smtp-source`: messages per second accepted and durably queued (each acknowledged
with 250 only once on disk) at 1, 10 and 100 concurrent sessions, and memory per
idle session (proportional set size, so shared libraries count once).

Trusts the programs it measures; writes only under $BENCH_WORK and into the results.
"""

import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

import bench as B

LISTEN_N = B.knob("BENCH_LISTEN_N", 5000, 300)  # messages per concurrency level
SESSIONS = (1, 10, 100)
IDLE_SESSIONS = B.knob("BENCH_IDLE_SESSIONS", 200, 50)
SIZE = 4096  # bytes of each generated message


def smtp_source():
    for p in (B.PEERS / "postfix/usr/sbin/smtp-source", Path("/usr/sbin/smtp-source")):
        if p.exists():
            return p
    return None


def pss(pid):
    """Proportional set size in kB (shared pages divided among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def idle_memory(port, procs):
    """kB per idle session: open IDLE_SESSIONS connections, read each greeting, and
    compare the summed PSS of `procs()` before and after."""
    before = sum(pss(p) for p in procs())
    conns = []
    for _ in range(IDLE_SESSIONS):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.recv(512)
        conns.append(s)
    time.sleep(1)
    after = sum(pss(p) for p in procs())
    for s in conns:
        s.close()
    return (after - before) / IDLE_SESSIONS


class Relay365Listen:
    name = "relay365 listen"

    def __init__(self, system):
        self.s = system
        self.port = B.free_port()
        self.proc = None

    def setup(self):
        self.s.setup()
        with open(self.s.cfg, "a") as f:
            f.write(f'\n[listener]\nlisten = ["127.0.0.1:{self.port}"]\n'
                    "max_connections = 1000\nmax_connections_per_client = 1000\n")

    def start(self):
        self.proc = subprocess.Popen(
            [str(self.s.bin / "relay365"), "--config", str(self.s.cfg), "listen"],
            env=B.base_env(), stdout=subprocess.DEVNULL,
            stderr=open(B.WORK / "relay365-listen.log", "w"))
        if not wait_port(self.port):
            raise RuntimeError("relay365 listen did not start")

    def stop(self):
        B.stop_process(self.proc)
        self.proc = None

    def reset(self):
        self.stop()
        self.s.reset()
        self.start()

    def queued(self):
        return B.count_files(self.s.spool / "incoming" / "new")

    def procs(self):
        return [self.proc.pid]


class PostfixSmtpd:
    name = "postfix smtpd"

    def __init__(self, system):
        self.s = system
        self.port = B.free_port()

    def setup(self):
        self.s.setup()
        self.s.postconf("-M", f"{self.port}/inet={self.port} inet n - n - - smtpd")
        self.s.postconf(
            "-e", "mynetworks = 127.0.0.0/8", "default_process_limit = 300",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0", "smtpd_client_message_rate_limit = 0")

    def start(self):
        self.s.start()
        if not wait_port(self.port):
            raise RuntimeError("postfix smtpd did not start")

    def stop(self):
        self.s.stop()

    def reset(self):
        self.s.reset()
        self.start()

    def queued(self):
        return None

    def procs(self):
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if (d / "comm").read_text().strip() == "smtpd":
                        out.append(int(d.name))
                except OSError:
                    pass
        return out


def run_source(tool, port, sessions, n):
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(tool), "-s", str(sessions), "-m", str(n), "-l", str(SIZE), "-f", B.SENDER,
         "-t", B.RCPT, f"127.0.0.1:{port}"],
        env=B.base_env(LD_LIBRARY_PATH=B.PEERS / "postfix/usr/lib/postfix"),
        capture_output=True, text=True, check=False)
    return time.perf_counter() - t0, r.returncode, r.stderr[-300:]


def case_listen(bench):
    B.say(f"case listen: relay365 listen vs postfix smtpd, smtp-source, {LISTEN_N} messages "
          f"at {SESSIONS} sessions")
    tool = smtp_source()
    lines = ["### 7. The network listener: `relay365 listen` against Postfix's smtpd", ""]
    if tool is None:
        bench.report.set("listen", "\n".join(lines + ["smtp-source not found (package postfix): skipped."]))
        return
    bench.sink.start()
    targets = []
    r = bench.by_name("relay365")
    if r:
        targets.append(Relay365Listen(r))
    p = bench.by_name("postfix")
    if p:
        targets.append(PostfixSmtpd(p))
    else:
        lines.append(f"Postfix skipped: {bench.skipped.get('postfix', 'not set up')}.")
    rates = {}
    notes = {}
    memory = {}
    for t in targets:
        try:
            t.setup()
            for s in SESSIONS:
                t.reset()
                dt, rc, err = run_source(tool, t.port, s, LISTEN_N)
                q = t.queued()
                if rc != 0 or (q is not None and q != LISTEN_N):
                    notes[(t.name, s)] = f"exit {rc}, queued {q}: {err.strip()}"
                rates[(t.name, s)] = LISTEN_N / dt
                B.say(f"  {t.name} {s} sessions: {LISTEN_N / dt:.0f} msg/s")
            t.reset()
            memory[t.name] = idle_memory(t.port, t.procs)
            B.say(f"  {t.name}: {memory[t.name]:.0f} kB per idle session")
        finally:
            t.stop()
    lines += [
        f"smtp-source (`-l {SIZE}`) sends {LISTEN_N} messages over 1, 10 and 100 concurrent "
        "sessions to each listener on loopback; a message counts once its `250` arrived, "
        "which both give only after the message is on disk (relay365: fsync of the file and "
        "of `incoming/new`; Postfix: cleanup's fsync of the queue file). Postfix's queue "
        "manager relays to the sink meanwhile; relay365's daemon is not running. Memory: "
        f"{IDLE_SESSIONS} connections opened and greeted, then the growth of the summed "
        "proportional set size (relay365: the one listener process; Postfix: every smtpd "
        "process), per session.",
        "",
        "| system | " + " | ".join(f"{s} session{'s' if s > 1 else ''} (msg/s)" for s in SESSIONS)
        + " | kB per idle session |",
        "|---|" + "---:|" * (len(SESSIONS) + 1),
    ]
    for t in targets:
        cells = [f"{rates.get((t.name, s), 0):.0f}" for s in SESSIONS]
        lines.append(f"| {t.name} | " + " | ".join(cells) + f" | {memory.get(t.name, 0):.0f} |")
    for (name, s), note in notes.items():
        lines.append(f"\n{name} at {s} sessions: {note}")
    bench.report.set("listen", "\n".join(lines))
