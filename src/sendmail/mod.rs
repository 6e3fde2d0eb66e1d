//! The `sendmail` front end: options, privilege handling, and message intake.
pub mod cli;
pub mod intake;
pub mod options;
pub mod privilege;
