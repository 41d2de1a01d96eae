#!/usr/bin/env bash
# Crash safety and graceful shutdown with the release binary as a real
# process: SIGKILL during a burst of mints, restart on the same data
# directory, then check that every JWT a client received is in the audit
# ledger, the chain and sinks verify (`agentkeys-broker audit verify`), and
# the grant's uses cover what it released; and SIGTERM during a burst exits
# 0 with the sinks flushed. Loopback only; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test api -- crash:: shutdown:: --nocapture
