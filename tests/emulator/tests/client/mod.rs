//! A deliberately plain SMTP/HTTPS client (TcpStream + rustls) for driving the emulator in
//! tests, so the emulator is checked against raw protocol bytes rather than another library.
//!
//! Trusts only the emulator's CA, handed in by the test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use relay365_emulator::Emulator;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

pub fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

pub fn tls_config(ca_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
    None,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::None => Ok(0),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::None => Ok(0),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::None => Ok(()),
        }
    }
}

/// A reply: code and the text of every line (after the code and separator).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
    pub fn first(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().cloned().unwrap_or_default()
        )
    }
}

pub struct Smtp {
    r: BufReader<Stream>,
    port: u16,
}

impl Smtp {
    pub fn connect(port: u16) -> Smtp {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Smtp {
            r: BufReader::new(Stream::Plain(s)),
            port,
        }
    }

    /// Connects and reads the greeting.
    pub fn open(emu: &Emulator) -> (Smtp, Reply) {
        let mut c = Smtp::connect(emu.port());
        let g = c.read_reply().unwrap();
        (c, g)
    }

    pub fn connect_implicit(port: u16, ca_pem: &str, name: &str) -> std::io::Result<Smtp> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut c = Smtp {
            r: BufReader::new(Stream::Plain(s)),
            port,
        };
        c.tls(ca_pem, name)?;
        Ok(c)
    }

    fn tls(&mut self, ca_pem: &str, name: &str) -> std::io::Result<()> {
        let stream = std::mem::replace(self.r.get_mut(), Stream::None);
        let Stream::Plain(mut sock) = stream else {
            panic!("already TLS")
        };
        let mut conn = ClientConnection::new(
            tls_config(ca_pem),
            ServerName::try_from(name.to_owned()).unwrap(),
        )
        .map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        self.r = BufReader::new(Stream::Tls(Box::new(StreamOwned::new(conn, sock))));
        Ok(())
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
        self.r.get_mut().flush().unwrap();
    }

    pub fn read_reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed",
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not SMTP: {line:?}"),
                )
            })?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> Reply {
        self.try_cmd(line).unwrap()
    }

    pub fn try_cmd(&mut self, line: &str) -> std::io::Result<Reply> {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// EHLO, STARTTLS, handshake against the CA for `localhost`, EHLO again.
    pub fn starttls(&mut self, ca_pem: &str) -> Reply {
        assert_eq!(self.cmd("EHLO client.test").code, 250);
        let r = self.cmd("STARTTLS");
        assert_eq!(r.first(), "220 2.0.0 SMTP server ready");
        self.tls(ca_pem, "localhost").unwrap();
        self.cmd("EHLO client.test")
    }

    /// Starts TLS right away (after the caller read the 220 itself), for `localhost`.
    pub fn into_tls(mut self, ca_pem: &str) -> Smtp {
        self.tls(ca_pem, "localhost").unwrap();
        self
    }

    pub fn try_starttls(&mut self, ca_pem: &str, name: &str) -> std::io::Result<()> {
        assert_eq!(self.cmd("EHLO client.test").code, 250);
        assert_eq!(self.cmd("STARTTLS").code, 220);
        self.tls(ca_pem, name)
    }

    pub fn login(&mut self, user: &str, pass: &str) -> Reply {
        assert_eq!(self.cmd("AUTH LOGIN").first(), "334 VXNlcm5hbWU6");
        assert_eq!(self.cmd(&b64(user)).first(), "334 UGFzc3dvcmQ6");
        self.cmd(&b64(pass))
    }

    /// Greeting, STARTTLS, AUTH LOGIN — ready for MAIL.
    pub fn ready(emu: &Emulator, user: &str, pass: &str) -> Smtp {
        let (mut c, _) = Smtp::open(emu);
        c.starttls(&emu.ca_pem());
        assert_eq!(c.login(user, pass).code, 235);
        c
    }

    /// MAIL, RCPT..., DATA, body (dot-stuffed here), final reply.
    pub fn send(&mut self, from: &str, rcpts: &[&str], body: &str) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "{}", r.text());
        for rc in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rc}>"));
            assert_eq!(r.code, 250, "{}", r.text());
        }
        assert_eq!(self.cmd("DATA").code, 354);
        self.send_raw(&stuff(body));
        self.read_reply().unwrap()
    }
}

/// Dot-stuffs a CRLF body and appends the terminator.
pub fn stuff(body: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in body.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push(b'.');
        }
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(b".\r\n");
    out
}

pub fn message(from: &str, to: &str, subject: &str) -> String {
    format!(
        "From: Sender <{from}>\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nHello.\r\n"
    )
}

/// One HTTPS POST with a form body; returns (status, body).
pub fn https_post(
    port: u16,
    path: &str,
    form: &str,
    ca_pem: &str,
) -> std::io::Result<(u16, String)> {
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = ClientConnection::new(
        tls_config(ca_pem),
        ServerName::try_from("localhost").unwrap(),
    )
    .map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, sock);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("Content-Length: ") {
            len = v.parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok((status, String::from_utf8(body).unwrap()))
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Fetches a token with a client secret; panics unless the endpoint answers 200.
pub fn fetch_token(emu: &Emulator, tenant: &str, client_id: &str, secret: &str) -> String {
    let form = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
        urlencode(client_id),
        urlencode(secret),
        urlencode(relay365_emulator::SCOPE)
    );
    let (status, body) = https_post(
        emu.token_port().unwrap(),
        &format!("/{tenant}/oauth2/v2.0/token"),
        &form,
        &emu.ca_pem(),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

pub fn xoauth2(user: &str, token: &str) -> String {
    b64(&format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}
