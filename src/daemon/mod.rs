//! The daemon: pickup, scheduler, quota governor and bounce generation.

pub mod quota;
