//! The message as a caller wrote it: the header block reader, addresses, and the
//! header completion Postfix's cleanup performs, the From policy, and the one-line
//! text scrubber. Pure logic; no I/O.
pub mod address;
pub mod complete;
pub mod date;
pub mod header;
pub mod qualify;
pub mod rewrite;
pub mod text;
