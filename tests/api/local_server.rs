//! A local server a feature's test needs (anvil for `audit-evm`, moto for
//! `kms`): started on a loopback port, required in CI, skipped loudly
//! elsewhere.

use std::process::{Child, Command, Stdio};

use crate::process::tool_missing;

/// A local server a test needs (anvil, moto), killed on drop.
pub struct LocalServer {
    child: Child,
    pub url: String,
}

impl LocalServer {
    /// Starts the binary `$var` names (else `default`) on loopback `port`
    /// (say [`crate::process::free_port`]), with the arguments `args` gives for it. Where it
    /// cannot start, see [`tool_missing`]: `None` where the test may skip.
    pub fn start(
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
                tool_missing(
                    test,
                    Some(var),
                    &format!("cannot run `{binary}` ({e}); {install}"),
                );
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
