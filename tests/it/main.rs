//! relay365's integration tests: the real binaries against temporary spools and,
//! for delivery, real servers on 127.0.0.1.
mod admin;
mod crash;
mod delivery;
mod exchange;
mod faults;
mod fleet;
mod graph;
mod harness;
mod harvest;
mod hostile;
mod intake;
mod layers;
mod listen;
mod load;
mod monitoring;
mod postfix;
mod privilege;
mod proxy;
mod quota;
mod resources;
mod smtp_stdio;
mod stress;
