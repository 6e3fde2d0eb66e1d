//! Transport: how the daemon hands queued mail to Microsoft 365 and how it reads the
//! answers. Trusts nothing it receives from the network until TLS has verified the
//! peer, and treats every byte of a server reply as untrusted.
pub mod capture;
pub mod classify;
pub mod oauth;
pub mod reply;
pub mod smtp;
pub mod tls;
