//! The exact reply texts of Exchange Online, with their `[HOST time session]` tails and
//! `[BeginDiagnosticData]` blocks, built from the current time.
//!
//! Inputs are the emulator's own configuration and addresses the client sent; client text is
//! only ever echoed inside a reply after CR/LF are removed, so it cannot forge extra reply lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::clock::Civil;

static RNG: AtomicU64 = AtomicU64::new(0);

/// A fast non-cryptographic 64-bit random number (SplitMix64 over a shared counter seeded
/// from the clock): enough for session ids and message ids, not for tokens.
pub(crate) fn random_u64() -> u64 {
    let mut seed = RNG.load(Ordering::Relaxed);
    if seed == 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let _ = RNG.compare_exchange(0, now | 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    seed = RNG.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A session id like `08DE2A6028D26C22`.
pub(crate) fn session_id() -> String {
    format!("{:016X}", random_u64())
}

/// Client-supplied text made safe to echo inside a single reply line.
pub(crate) fn echo(s: &str) -> String {
    // SECURITY: CR/LF from the client never reach the reply stream.
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

pub(crate) const SEND_AS_DIAGNOSTIC: &str = "Cannot submit message. 0.35250:0A00C784, 1.36674:0A000000, 1.61250:00000000, 1.45378:02000000, 1.44866:31000000, 16.55847:10120000, 17.43559:0000000038020000000000000000000000000000, 20.52176:140FAF8A0A0010100A000000, 20.50032:140FAF8A7A17001000000000, 0.35180:0A000000, 255.23226:00000000, 255.27962:0A000000, 255.27962:0E000000, 255.31418:0A00B3E2, 0.35250:00000000, 4.21921:DD040000, 255.27962:FA000000, 255.1494:00000000, 0.37692:30000000, 0.44092:00000000, 0.40156:2E020000, 0.38698:00000000, 0.37692:0F010480, 0.37948:86030000, 5.33852:00000000534D545000010480, 7.36354:010000000000010900000000, 4.56248:DD040000, 7.40748:010000000000010B05000780, 7.57132:000000000000000005000780, 1.63016:32000000, 4.39640:DD040000, 8.45434:3A8BA3DF03B4D04B8B4C0B12D0EAA0F0A5050780, 1.46798:04000000, 5.10786:0000000031352E32302E363235372E3032353A5359425032383220000000000000000000, 255.1750:0E000000, 255.31418:1E000000, 0.22753:7C000000, 255.21817:DD040000, 4.60547:DD040000, 0.21966:7E020000, 4.30158:DD040000";

pub(crate) const QUOTA_DIAGNOSTIC: &str = "Cannot submit message. 16.55847:D0070000, 17.43559:0000000098030000000000000000000000000000, 20.52176:140F4D870B0010100A000000, 20.50032:140F4D877B17001000000000, 0.35180:0A000000, 255.23226:0A000000, 255.27962:0A000000, 255.27962:0E000000, 255.31418:0A00D384, 0.35250:00000000, 4.21921:DD040000, 255.27962:FA000000, 255.1494:00000000, 0.37692:0A000000, 0.44092:00000000, 0.40156:2E020000, 0.38698:00000000, 5.33852:00000000534D545000010480, 7.36354:010000000000010900000000, 4.56248:DD040000, 7.40748:010000000000010B05000780, 7.57132:000000000000000005000780, 1.63016:32000000, 4.39640:DD040000, 8.45434:3A8BA3DF03B4D04B8B4C0B12D0EAA0F0A5050780, 5.10786:0000000031352E32302E363235372E3032353A5359425032383220000000000000000000, 255.1750:0E000000";

/// Reply builder for one SMTP session.
pub(crate) struct Replies<'a> {
    pub hostname: &'a str,
    pub mailbox_server: &'a str,
    pub session_id: &'a str,
}

impl Replies<'_> {
    /// `[SY5P282CA0097.outlook.office365.com 2025-11-23T11:12:20.123Z 08DE2A6028D26C22]`
    pub(crate) fn tail(&self) -> String {
        format!(
            "[{} {} {}]",
            self.hostname,
            Civil::now().iso_millis(),
            self.session_id
        )
    }

    /// An error reply with the modern tail.
    pub(crate) fn err(&self, text: &str) -> String {
        format!("{text} {}", self.tail())
    }

    pub(crate) fn greeting(&self) -> String {
        format!(
            "220 {} Microsoft ESMTP MAIL Service ready at {} [{}]",
            self.hostname,
            Civil::now().rfc2822(),
            self.session_id
        )
    }

    pub(crate) fn ehlo(&self, peer: &str, esmtp: bool, tls_ext: TlsExt, max_size: u64) -> String {
        let first = format!("{} Hello [{}]", self.hostname, peer);
        if !esmtp {
            return format!("250 {first}");
        }
        let mut lines = vec![
            first,
            format!("SIZE {max_size}"),
            "PIPELINING".into(),
            "DSN".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        match tls_ext {
            TlsExt::StartTls => lines.push("STARTTLS".into()),
            TlsExt::Auth => lines.push("AUTH LOGIN XOAUTH2".into()),
            TlsExt::Nothing => {}
        }
        lines.extend(["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"].map(String::from));
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `250 2.0.0 OK <id> [Hostname=...]`
    pub(crate) fn queued(&self, message_id: &str) -> String {
        format!(
            "250 2.0.0 OK {message_id} [Hostname={}]",
            self.mailbox_server
        )
    }

    fn storedrv(&self, head: &str, diag: &str) -> String {
        format!(
            "{head}; Failed to process message due to a permanent exception with message [BeginDiagnosticData]{diag}[EndDiagnosticData] [Hostname={}] {}",
            self.mailbox_server,
            self.tail()
        )
    }

    pub(crate) fn send_as_denied(&self, mailbox: &str, from: &str) -> String {
        self.storedrv(
            &format!(
                "554 5.2.252 SendAsDenied; {} not allowed to send as {}; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
                echo(mailbox),
                echo(from)
            ),
            SEND_AS_DIAGNOSTIC,
        )
    }

    pub(crate) fn envelope_denied(&self) -> String {
        self.err("550 5.7.60 SMTP; Client does not have permissions to send as this sender")
    }

    pub(crate) fn quota_exceeded(&self) -> String {
        self.storedrv(
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
            QUOTA_DIAGNOSTIC,
        )
    }

    pub(crate) fn thread_limit(&self) -> String {
        format!(
            "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname={}] {}",
            self.mailbox_server,
            self.tail()
        )
    }

    pub(crate) fn too_big(&self) -> String {
        self.err("552 5.3.4 Message size exceeds fixed maximum message size")
    }

    pub(crate) fn generated_message_id(&self) -> String {
        format!(
            "<{:016X}{:016X}@{}>",
            random_u64(),
            random_u64(),
            self.mailbox_server
        )
    }
}

/// Which TLS-dependent extension an EHLO list carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsExt {
    StartTls,
    Auth,
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Replies<'static> {
        Replies {
            hostname: "H.example",
            mailbox_server: "MB.EXAMPLE",
            session_id: "08DE2A6028D26C22",
        }
    }

    #[test]
    fn ehlo_lists_match_the_doc() {
        let before = r().ehlo("127.0.0.1", true, TlsExt::StartTls, 157_286_400);
        assert_eq!(
            before,
            "250-H.example Hello [127.0.0.1]\n250-SIZE 157286400\n250-PIPELINING\n250-DSN\n250-ENHANCEDSTATUSCODES\n250-STARTTLS\n250-8BITMIME\n250-BINARYMIME\n250-CHUNKING\n250 SMTPUTF8"
        );
        let after = r().ehlo("127.0.0.1", true, TlsExt::Auth, 157_286_400);
        assert!(after.contains("250-AUTH LOGIN XOAUTH2\n250-8BITMIME"));
        assert!(!after.contains("STARTTLS"));
        assert_eq!(
            r().ehlo("127.0.0.1", false, TlsExt::Auth, 1),
            "250 H.example Hello [127.0.0.1]"
        );
    }

    #[test]
    fn tails_and_diagnostics() {
        let t = r().err("535 5.7.3 Authentication unsuccessful");
        assert!(t.starts_with("535 5.7.3 Authentication unsuccessful [H.example 20"));
        assert!(t.ends_with("Z 08DE2A6028D26C22]"));
        let q = r().quota_exceeded();
        assert!(q.starts_with(
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed"
        ));
        assert!(q.contains("[BeginDiagnosticData]Cannot submit message."));
        assert!(q.contains("[EndDiagnosticData] [Hostname=MB.EXAMPLE] [H.example "));
        assert!(
            r().greeting()
                .starts_with("220 H.example Microsoft ESMTP MAIL Service ready at ")
        );
        assert!(r().greeting().ends_with(" +0000 [08DE2A6028D26C22]"));
        assert_eq!(echo("a\r\n250 ok"), "a250 ok");
        assert_ne!(session_id(), session_id());
    }
}
