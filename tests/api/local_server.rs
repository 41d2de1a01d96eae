//! A local server a feature's test needs (anvil for `audit-evm`, moto for
//! `kms`): started on a free port, required in CI, skipped loudly elsewhere.

use std::process::{Child, Command, Stdio};

use crate::process::free_port;

/// A local server a test needs (anvil, moto), killed on drop.
pub struct LocalServer {
    child: Child,
    pub url: String,
}

impl LocalServer {
    /// Starts the binary `$var` names (else `default`) on a free loopback
    /// port, with the arguments `args` gives for that port. Where it cannot
    /// start, fails the test if `$var` or `CI` is set; elsewhere says
    /// SKIPPED (past the harness's capture) and answers `None`.
    pub fn start(
        var: &str,
        default: &str,
        args: impl FnOnce(u16) -> Vec<String>,
        test: &str,
        install: &str,
    ) -> Option<Self> {
        Self::start_at(free_port(), var, default, args, test, install)
    }

    /// [`Self::start`] on `port`.
    pub fn start_at(
        port: u16,
        var: &str,
        default: &str,
        args: impl FnOnce(u16) -> Vec<String>,
        test: &str,
        install: &str,
    ) -> Option<Self> {
        let binary = std::env::var(var).unwrap_or_else(|_| default.into());
        let child = Command::new(&binary)
            .args(args(port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(Self {
                child,
                url: format!("http://127.0.0.1:{port}"),
            }),
            Err(e) => {
                let why = format!("cannot run `{binary}` ({e}); {install}");
                if std::env::var_os(var).is_some() || std::env::var_os("CI").is_some() {
                    panic!("the {test} test must run here: {why}");
                }
                use std::io::Write;
                let _ = writeln!(std::io::stderr().lock(), "SKIPPED the {test} test: {why}");
                None
            }
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
