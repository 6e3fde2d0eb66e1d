//! The listener's side of TLS: the server configuration (rustls, TLS 1.2 and 1.3
//! only) from the `[listener]` certificate and key, and the connection [`Conn`]: a
//! TCP stream with its own bounded read buffer that STARTTLS turns into a TLS stream.
//!
//! Trusts the certificate and key files (root's); trusts nothing the client sends.

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::sendmail::bs::network::Channel;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}; check tls_cert and tls_key in [listener]")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}; tls_cert needs a PEM certificate chain, tls_key a PEM private key")]
    Pem { path: String, what: String },
    #[error("the certificate and key do not fit together: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads the certificate chain and key into a server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let pem_err = |p: &Path, what: String| TlsError::Pem {
        path: p.display().to_string(),
        what,
    };
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert, "no certificate found".into()));
    }
    let key_pem = read(key)?;
    let key: PrivateKeyDer<'static> =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => pem_err(key, "no private key found".into()),
            e => pem_err(key, e.to_string()),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // SECURITY: TLS 1.2 and 1.3 only; old devices that cannot do them send in plain
    // text from an `allow`ed network, never with a password.
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Bytes read from the client and not yet consumed: at most this many per connection.
const READ_BUFFER: usize = 8 * 1024;

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// Between taking the plain stream and the TLS one being ready (a failed handshake).
    Gone,
}

/// A client connection: plain TCP, or TLS after STARTTLS.
pub struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    tls: Option<Arc<ServerConfig>>,
}

impl Conn {
    pub fn new(stream: TcpStream, tls: Option<Arc<ServerConfig>>) -> Conn {
        Conn {
            stream: Stream::Plain(stream),
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            tls,
        }
    }

    /// Ends TLS politely (close_notify), if it is up.
    pub fn close(&mut self) {
        if let Stream::Tls(s) = &mut self.stream {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }

    fn gone() -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Conn {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.end {
            let n = match &mut self.stream {
                Stream::Plain(s) => s.read(&mut self.buf)?,
                Stream::Tls(s) => match s.read(&mut self.buf) {
                    // A client that closes without close_notify has still ended the input.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                    r => r?,
                },
                Stream::Gone => return Err(Conn::gone()),
            };
            self.pos = 0;
            self.end = n;
        }
        Ok(&self.buf[self.pos..self.end])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.end);
    }
}

impl Write for Conn {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Plain(s) => s.write(data),
            Stream::Tls(s) => s.write(data),
            Stream::Gone => Err(Conn::gone()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Gone => Err(Conn::gone()),
        }
    }
}

impl Channel for Conn {
    fn start_tls(&mut self) -> io::Result<()> {
        let Some(config) = self.tls.clone() else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no certificate"));
        };
        // SECURITY: whatever the client pipelined after STARTTLS in plain text is
        // thrown away, never read as a command inside TLS (CVE-2011-0411).
        self.pos = 0;
        self.end = 0;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let conn = ServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    fn tls(&self) -> Option<String> {
        let Stream::Tls(s) = &self.stream else {
            return None;
        };
        let version = match s.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
            v => format!("{v:?}"),
        };
        let cipher = s
            .conn
            .negotiated_cipher_suite()
            .map(|c| format!(" with cipher {:?}", c.suite()))
            .unwrap_or_default();
        Some(format!("{version}{cipher}"))
    }
}
