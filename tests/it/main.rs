//! relay365's integration tests: the real binaries against temporary spools and,
//! for delivery, real servers on 127.0.0.1.
mod delivery;
mod harness;
mod hostile;
mod intake;
