//! Running the `recoup` binary from the integration tests.

use std::process::{Command, Output};

pub fn recoup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recoup"))
        .args(args)
        .output()
        .expect("recoup runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
