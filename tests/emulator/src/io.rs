//! Buffered line I/O over a plain or TLS socket, with STARTTLS upgrade, idle timeout and
//! prompt exit on emulator shutdown.
//!
//! Reads bytes from an untrusted SMTP/HTTP client: lines are bounded, and plaintext read
//! ahead of a STARTTLS is discarded, never interpreted after the upgrade.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// How often a blocked read wakes to look at the shutdown flag.
const TICK: Duration = Duration::from_millis(200);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 64 * 1024;

enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
    Gone,
}

/// Why reading stopped.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// The client closed the connection or the emulator is shutting down.
    Closed,
    /// No byte for the idle timeout.
    Idle,
    /// A line longer than allowed (the rest of it was skipped).
    TooLong,
    Io(io::Error),
}

impl From<io::Error> for ReadStop {
    fn from(e: io::Error) -> ReadStop {
        ReadStop::Io(e)
    }
}

pub(crate) struct Io {
    transport: Transport,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
    shutdown: Arc<AtomicBool>,
    idle: Duration,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Io {
    pub(crate) fn new(
        sock: TcpStream,
        shutdown: Arc<AtomicBool>,
        idle: Duration,
    ) -> io::Result<Io> {
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(TICK))?;
        // A client that never reads must not pin a thread forever.
        sock.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Io {
            transport: Transport::Plain(sock),
            rbuf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            wbuf: Vec::with_capacity(4096),
            shutdown,
            idle,
        })
    }

    /// Whether bytes beyond what was read so far already sit in the buffer.
    pub(crate) fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// Replaces the plain socket with a TLS session and completes the handshake.
    pub(crate) fn start_tls(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        // SECURITY: plaintext pipelined after STARTTLS is dropped, never read as if it came over TLS.
        self.start = 0;
        self.end = 0;
        let Transport::Plain(mut sock) = std::mem::replace(&mut self.transport, Transport::Gone)
        else {
            return Err(io::Error::other(
                "STARTTLS on a connection that is not plain",
            ));
        };
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while conn.is_handshaking() {
            match conn.complete_io(&mut sock) {
                Ok((0, 0)) if conn.wants_read() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client left during TLS handshake",
                    ));
                }
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    if self.shutdown.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ));
                    }
                }
                Err(e) => {
                    // Send the alert rustls queued (e.g. protocol_version) before giving up.
                    let _ = conn.write_tls(&mut sock);
                    return Err(e);
                }
            }
        }
        self.transport = Transport::Tls(Box::new(StreamOwned::new(conn, sock)));
        Ok(())
    }

    fn raw_read(&mut self, at: usize) -> io::Result<usize> {
        let buf = &mut self.rbuf[at..];
        match &mut self.transport {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
            Transport::Gone => Ok(0),
        }
    }

    /// Reads more bytes into the buffer, waiting at most the idle timeout.
    fn fill(&mut self) -> Result<(), ReadStop> {
        self.flush()?;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.rbuf.len() {
            if self.start > 0 {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.rbuf.len();
                self.rbuf.resize(n * 2, 0);
            }
        }
        let deadline = Instant::now() + self.idle;
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return Err(ReadStop::Closed);
            }
            match self.raw_read(self.end) {
                Ok(0) => return Err(ReadStop::Closed),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        return Err(ReadStop::Idle);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ReadStop::Closed),
                Err(e) => return Err(ReadStop::Io(e)),
            }
        }
    }

    /// The next line including its LF, at most `max` bytes. Over-long lines are skipped whole.
    pub(crate) fn read_line(&mut self, max: usize) -> Result<&[u8], ReadStop> {
        let mut scanned = 0;
        let mut skipping = false;
        loop {
            let avail = &self.rbuf[self.start + scanned..self.end];
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                let line_end = self.start + scanned + i + 1;
                if skipping || line_end - self.start > max {
                    self.start = line_end;
                    return Err(ReadStop::TooLong);
                }
                let line_start = self.start;
                self.start = line_end;
                return Ok(&self.rbuf[line_start..line_end]);
            }
            scanned = self.end - self.start;
            if scanned > max {
                // Keep memory bounded while skipping the rest of a hostile line.
                skipping = true;
                self.start = self.end;
                scanned = 0;
            }
            self.fill()?;
        }
    }

    /// Up to one line or, for lines longer than `chunk`, the next `chunk` bytes of it.
    /// Returns the bytes and whether they end a line.
    pub(crate) fn read_line_or_chunk(&mut self, chunk: usize) -> Result<(&[u8], bool), ReadStop> {
        let mut scanned = 0;
        loop {
            let avail = &self.rbuf[self.start + scanned..self.end];
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                let s = self.start;
                self.start = s + scanned + i + 1;
                return Ok((&self.rbuf[s..self.start], true));
            }
            scanned = self.end - self.start;
            if scanned >= chunk {
                let s = self.start;
                self.start = self.end;
                return Ok((&self.rbuf[s..self.end], false));
            }
            self.fill()?;
        }
    }

    /// Exactly `n` bytes (BDAT), handed to `sink` piecewise.
    pub(crate) fn read_exact_to(
        &mut self,
        mut n: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), ReadStop> {
        while n > 0 {
            if self.start == self.end {
                self.fill()?;
            }
            let take = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
            sink(&self.rbuf[self.start..self.start + take]);
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = match &mut self.transport {
            Transport::Plain(s) => s.write_all(&self.wbuf).and_then(|_| s.flush()),
            Transport::Tls(s) => s.write_all(&self.wbuf).and_then(|_| s.flush()),
            Transport::Gone => Ok(()),
        };
        self.wbuf.clear();
        res
    }

    /// Flushes what is pending and closes the socket (TLS close_notify first).
    pub(crate) fn close(&mut self) {
        let _ = self.flush();
        match std::mem::replace(&mut self.transport, Transport::Gone) {
            Transport::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Transport::Tls(mut s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                let _ = s.sock.shutdown(Shutdown::Both);
            }
            Transport::Gone => {}
        }
    }

    /// Closes without flushing anything: a dropped connection as the client sees it.
    pub(crate) fn abort(&mut self) {
        self.wbuf.clear();
        match std::mem::replace(&mut self.transport, Transport::Gone) {
            Transport::Plain(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Transport::Tls(s) => {
                let _ = s.sock.shutdown(Shutdown::Both);
            }
            Transport::Gone => {}
        }
    }

    /// Sleeps `d` in ticks, returning early (false) if the emulator shuts down.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        sleep_unless(&self.shutdown, d)
    }
}

/// Sleeps `d` in ticks; false if `flag` was raised meanwhile.
pub(crate) fn sleep_unless(flag: &AtomicBool, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if flag.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(TICK));
    }
}
