//! A local server a feature's test needs (anvil for `audit-evm`, moto for
//! `kms`): started on a loopback port, required in CI, skipped loudly
//! elsewhere.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use crate::process::tool_missing;

/// A local server a test needs (anvil, moto), killed on drop: in a
/// process group of its own, so a launcher's children (npm's anvil is a
/// Node script that runs the real binary) are signalled and killed too.
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
            .process_group(0)
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

    /// Sends `signal` (`-STOP`, `-CONT`) to the server's process group.
    pub fn signal(&self, signal: &str) {
        let group = format!("-{}", self.child.id());
        let status = Command::new("kill")
            .args([signal, "--", &group])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
