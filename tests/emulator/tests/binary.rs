//! The `relay365-emulator` binary: ports, CA and messages written under `--dir`.
//!
//! Runs the binary built by cargo on 127.0.0.1 and kills it (by its own pid) at the end.

mod client;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use client::*;

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_writes_ports_ca_and_messages() {
    let dir = std::env::temp_dir().join(format!("relay365-emulator-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_relay365-emulator"))
        .args([
            "--dir",
            dir.to_str().unwrap(),
            "--mailbox",
            "app@contoso.com:pw",
            "--message-rate",
            "100/1s",
        ])
        .args([
            "--app",
            "t1:c1:sec:ret:app@contoso.com",
            "--reply-delay-ms",
            "1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Kill(child);
    let port: u16 = wait_for(&dir.join("smtp.port")).trim().parse().unwrap();
    let ca = wait_for(&dir.join("ca.pem"));
    let token_port: u16 = wait_for(&dir.join("token.port")).trim().parse().unwrap();
    assert_ne!(token_port, port);

    let mut c = Smtp::connect(port);
    assert_eq!(c.read_reply().unwrap().code, 220);
    c.starttls(&ca);
    assert_eq!(c.login("app@contoso.com", "pw").code, 235);
    let body = message("app@contoso.com", "x@example.org", "bin");
    assert_eq!(
        c.send("app@contoso.com", &["x@example.org"], &body).code,
        250
    );
    c.cmd("QUIT");

    let json = wait_for(&dir.join("messages/000001.json"));
    let eml = std::fs::read(dir.join("messages/000001.eml")).unwrap();
    assert_eq!(eml, body.as_bytes());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["mailbox"], "app@contoso.com");
    assert_eq!(v["rcpts"][0], "x@example.org");
    assert_eq!(v["message_id"], "<bin@test>");

    // The secret with colons in it was kept whole.
    let form = format!(
        "grant_type=client_credentials&client_id=c1&client_secret=sec%3Aret&scope={}",
        urlencode(relay365_emulator::SCOPE)
    );
    let (status, _) = https_post(token_port, "/t1/oauth2/v2.0/token", &form, &ca).unwrap();
    assert_eq!(status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
