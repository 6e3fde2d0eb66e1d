//! The daemon: pickup of incoming files, queue runs, the quota governor, bounces and
//! local-recipient mapping. It owns the queue and the secrets; it distrusts every file
//! in `incoming/` and every byte from the network.
pub mod bounce;
pub mod check;
pub mod deliver;
pub mod engine;
pub mod pickup;
pub mod quota;
pub mod route;
