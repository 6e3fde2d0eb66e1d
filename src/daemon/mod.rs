//! The daemon's pure logic around the queue: bounces (RFC 3464 delivery status
//! notifications) and local-recipient mapping through /etc/aliases. Inputs come from the
//! daemon's own queue and root-owned configuration; remote text is sanitised where it is used.
pub mod aliases;
pub mod bounce;
