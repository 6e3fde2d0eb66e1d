//! `/usr/sbin/sendmail`, `mailq` and `newaliases`: see relay365-sendmail(8).
use std::process::ExitCode;

fn main() -> ExitCode {
    relay365::sendmail::cli::main(std::env::args_os().collect()).into()
}
