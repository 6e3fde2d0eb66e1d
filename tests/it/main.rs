//! relay365's integration tests: the real binaries against temporary spools and,
//! for delivery, real servers on 127.0.0.1.
mod admin;
mod crash;
mod delivery;
mod faults;
mod fleet;
mod harness;
mod hostile;
mod intake;
mod layers;
mod load;
mod postfix;
mod privilege;
mod quota;
mod resources;
mod smtp_stdio;
mod stress;
