//! relay365's integration tests: the real binaries against temporary spools and,
//! for delivery, real servers on 127.0.0.1.
mod admin;
mod delivery;
mod harness;
mod intake;
mod postfix;
mod quota;
mod smtp_stdio;
