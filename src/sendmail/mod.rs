//! The `sendmail` front end: options, privilege handling, message intake, and the
//! SMTP dialogue of `-bs`.
pub mod cli;
pub mod intake;
pub mod options;
pub mod privilege;
pub mod smtp;
