//! The daemon: pickup of incoming files, queue runs, the quota governor, bounces and
//! local-recipient mapping. It owns the queue and the secrets; it distrusts every file
//! in `incoming/` and every byte from the network.
pub mod aliases;
pub mod bounce;
pub mod check;
pub mod connect;
pub mod engine;
pub mod hold;
pub mod pickup;
pub mod quota;
pub mod route;
pub mod stop;
pub mod worker;
