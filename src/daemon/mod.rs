//! The daemon: pickup of incoming files, queue runs, bounces; it asks the quota
//! governor ([`crate::quota`]) before every transaction and maps local recipients
//! through [`crate::aliases`]. It owns the queue and the secrets; it distrusts every
//! file in `incoming/` and every byte from the network.
pub mod bounce;
pub mod check;
pub mod connect;
pub mod engine;
pub mod harvest;
pub mod hold;
pub mod metrics;
pub mod pickup;
pub mod queue_run;
pub mod route;
pub mod stop;
pub mod worker;
