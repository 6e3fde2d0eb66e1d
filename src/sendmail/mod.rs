//! The `sendmail` front end (the setgid program): options, privilege handling,
//! message intake, the deposit into `incoming/`, and the SMTP dialogue of `-bs`.
pub mod bs;
pub mod cli;
pub mod deposit;
pub mod intake;
pub mod mailq;
pub mod options;
pub mod privilege;
