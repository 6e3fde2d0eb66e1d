//! Transport: how the daemon hands queued mail to Microsoft 365 and how it reads the
//! answers. Everything here trusts the daemon's own queue and treats every byte from the
//! remote server as untrusted.
pub mod classify;
