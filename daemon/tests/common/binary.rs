//! How a test starts the `outpostd` binary it was built with.

use std::ffi::OsStr;
use std::process::Command;

/// A command for the `outpostd` binary under test.
pub fn outpostd() -> Command {
    through_runner(env!("CARGO_BIN_EXE_outpostd"))
}

/// A command for `program`, built for the target, through `OUTPOST_TEST_RUNNER` when that is set.
/// Under emulation (`cross/aarch64.sh` sets it to its qemu command line) the kernel has no binfmt
/// handler to start an aarch64 program by itself, so it goes through the runner cargo used for the
/// test.
pub fn through_runner(program: impl AsRef<OsStr>) -> Command {
    let runner = std::env::var("OUTPOST_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut command = Command::new(emulator);
            command.args(words).arg(program);
            command
        }
        None => Command::new(program),
    }
}
