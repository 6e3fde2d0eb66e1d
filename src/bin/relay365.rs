//! `relay365`: the daemon and the administrator's commands; see relay365(8).
use std::process::ExitCode;

fn main() -> ExitCode {
    relay365::admin::main(std::env::args_os().collect()).into()
}
