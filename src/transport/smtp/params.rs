//! The parameters of MAIL FROM and RCPT TO (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531
//! SMTPUTF8, RFC 3461 RET, ENVID, NOTIFY and ORCPT) for one transaction, from what the
//! server offers: a pure function of the transaction and the offer.
//!
//! Trusts the transaction (the daemon's queue, its addresses validated at intake);
//! ENVID and ORCPT values are caller-given and always go out as xtext.

use super::Offer;
use crate::transport::{Transaction, TxnRecipient};

/// The MAIL FROM parameters: `SIZE` always; `BODY=8BITMIME` for an 8-bit or declared
/// 8-bit message, `SMTPUTF8` for a non-ASCII address, and `RET` and `ENVID`, each only
/// when the server offers the extension.
pub fn mail_params(txn: &Transaction, offer: &Offer) -> Vec<String> {
    let mut params = vec![format!("SIZE={}", txn.message.len())];
    let eight_bit = !txn.message.is_ascii() || txn.declared_8bit;
    if eight_bit && offer.eight_bit {
        params.push("BODY=8BITMIME".into());
    }
    let utf8 = !txn.sender.is_ascii()
        || txn
            .recipients
            .iter()
            .any(|r| !r.address.as_str().is_ascii());
    if utf8 && offer.smtputf8 {
        params.push("SMTPUTF8".into());
    }
    if offer.dsn {
        if let Some(ret) = txn.dsn.ret {
            params.push(format!("RET={}", ret.as_str()));
        }
        if let Some(envid) = &txn.dsn.envid {
            params.push(format!("ENVID={}", xtext(envid.as_str())));
        }
    }
    params
}

/// One recipient's RCPT TO parameters: `NOTIFY` and `ORCPT` when the server offers DSN.
pub fn rcpt_params(txn: &Transaction, rcpt: &TxnRecipient, offer: &Offer) -> Vec<String> {
    let mut params = Vec::new();
    if offer.dsn {
        if let Some(n) = txn.dsn.notify {
            params.push(format!("NOTIFY={}", n.to_string().to_ascii_uppercase()));
        }
        if let Some(o) = rcpt.original {
            params.push(format!("ORCPT=rfc822;{}", xtext(o.as_str())));
        }
    }
    params
}

/// xtext (RFC 3461) for ENVID and ORCPT values.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::address::Address;
    use crate::spool::QueueId;
    use crate::spool::envelope::{Dsn, EnvId, Notify, Ret};

    /// A validated address that lives as long as the test.
    fn a(s: &str) -> &'static Address {
        Box::leak(Box::new(Address::parse(s).unwrap()))
    }

    fn no_dsn() -> &'static Dsn {
        Box::leak(Box::default())
    }

    fn to() -> TxnRecipient<'static> {
        TxnRecipient {
            address: a("x@example.org"),
            original: None,
        }
    }

    fn everything() -> Offer {
        Offer {
            eight_bit: true,
            smtputf8: true,
            dsn: true,
            ..Offer::default()
        }
    }

    fn txn<'a>(message: &'a [u8], rcpts: &[TxnRecipient<'a>]) -> Transaction<'a> {
        Transaction {
            id: Box::leak(Box::new(
                QueueId::parse("0000000000001000001000AB").unwrap(),
            )),
            sender: "app@contoso.com",
            recipients: rcpts.to_vec(),
            message,
            declared_8bit: false,
            dsn: no_dsn(),
        }
    }

    #[test]
    fn size_always_and_nothing_else_for_plain_mail() {
        let t = txn(b"Subject: a\r\n\r\nb\r\n", &[to()]);
        assert_eq!(mail_params(&t, &everything()), ["SIZE=17"]);
        assert_eq!(mail_params(&t, &Offer::default()), ["SIZE=17"]);
        assert!(rcpt_params(&t, &to(), &everything()).is_empty());
    }

    #[test]
    fn body_8bitmime_for_8bit_or_declared_bodies_when_offered() {
        let t = txn("é\r\n".as_bytes(), &[to()]);
        assert_eq!(mail_params(&t, &everything()), ["SIZE=4", "BODY=8BITMIME"]);
        assert_eq!(mail_params(&t, &Offer::default()), ["SIZE=4"]);
        let mut t = txn(b"a\r\n", &[to()]);
        t.declared_8bit = true;
        assert_eq!(mail_params(&t, &everything()), ["SIZE=3", "BODY=8BITMIME"]);
    }

    #[test]
    fn smtputf8_for_a_non_ascii_sender_or_recipient_when_offered() {
        let intl = TxnRecipient {
            address: a("jürgen@example.de"),
            original: None,
        };
        let t = txn(b"a\r\n", &[to(), intl]);
        assert_eq!(mail_params(&t, &everything()), ["SIZE=3", "SMTPUTF8"]);
        let offer = Offer {
            smtputf8: false,
            ..everything()
        };
        assert_eq!(mail_params(&t, &offer), ["SIZE=3"]);
        let mut t = txn(b"a\r\n", &[to()]);
        t.sender = "büro@contoso.com";
        assert_eq!(mail_params(&t, &everything()), ["SIZE=3", "SMTPUTF8"]);
    }

    #[test]
    fn ret_and_envid_only_with_dsn() {
        let mut t = txn(b"a\r\n", &[to()]);
        let dsn = Dsn {
            ret: Some(Ret::Full),
            envid: EnvId::parse("id+1=x"),
            ..Dsn::default()
        };
        t.dsn = &dsn;
        assert_eq!(
            mail_params(&t, &everything()),
            ["SIZE=3", "RET=FULL", "ENVID=id+2B1+3Dx"]
        );
        let dsn = Dsn {
            ret: Some(Ret::Hdrs),
            ..dsn.clone()
        };
        t.dsn = &dsn;
        assert_eq!(
            mail_params(&t, &everything()),
            ["SIZE=3", "RET=HDRS", "ENVID=id+2B1+3Dx"]
        );
        let offer = Offer {
            dsn: false,
            ..everything()
        };
        assert_eq!(mail_params(&t, &offer), ["SIZE=3"]);
    }

    #[test]
    fn notify_uppercased_and_orcpt_in_xtext_only_with_dsn() {
        let aliased = TxnRecipient {
            address: a("x@example.org"),
            original: Some(a("root+ops@host")),
        };
        let mut t = txn(b"a\r\n", std::slice::from_ref(&aliased));
        let dsn = Dsn {
            notify: Notify::parse("failure,delay"),
            ..Dsn::default()
        };
        t.dsn = &dsn;
        assert_eq!(
            rcpt_params(&t, &aliased, &everything()),
            ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;root+2Bops@host"]
        );
        assert_eq!(
            rcpt_params(&t, &to(), &everything()),
            ["NOTIFY=FAILURE,DELAY"]
        );
        let offer = Offer {
            dsn: false,
            ..everything()
        };
        assert!(rcpt_params(&t, &aliased, &offer).is_empty());
    }

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext("rfc822;x@y"), "rfc822;x@y");
    }
}
