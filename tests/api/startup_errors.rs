//! `serve` that cannot start says why in one line and exits with the code
//! the runbook documents for the cause, never with a panic.

use std::process::Output;

use crate::process::{broker_command, off_test_database};

/// The run's exit code and its stderr, which must be one line, no panic.
fn one_line_failure(output: &Output) -> (i32, String) {
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert!(!output.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    (output.status.code().unwrap_or(-1), stderr)
}

/// `serve` with a config file of `text`: its exit code and its one line
/// (only errors are logged: a start that goes further warns on the way).
fn serve_with_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, text).unwrap();
    // The file alone says where state is kept.
    let output = off_test_database(&mut broker_command(&dir.path().join("data"), 0))
        .env("AGENTKEYS__LOG__FILTER", "error")
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    one_line_failure(&output)
}

#[test]
fn a_port_in_use_exits_5_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = dir.path().join("data");
    let output = broker_command(&data, port).output().unwrap();
    let (code, stderr) = one_line_failure(&output);
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !data.join("audit.redb").exists(),
        "nothing started before the bind failed"
    );
}

#[test]
fn a_configuration_error_exits_3() {
    let (code, stderr) = serve_with_config("[server]\nbind = 8080\nno_such_key = true\n");
    assert_eq!(code, 3, "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let unknown = broker_command(&dir.path().join("data"), 0)
        .env("AGENTKEYS__LOG__FORMAT", "yaml")
        .output()
        .unwrap();
    let (code, stderr) = one_line_failure(&unknown);
    assert_eq!(code, 3, "{stderr}");
    // Not an address at all: a mistake in the config, not a busy port.
    let no_port = broker_command(&dir.path().join("data"), 0)
        .env("AGENTKEYS__SERVER__BIND", "127.0.0.1")
        .output()
        .unwrap();
    let (code, stderr) = one_line_failure(&no_port);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("server.bind"), "{stderr}");
}

/// Replicas take turns anchoring and go on from the contract's last
/// anchor: an on-chain anchor without a contract is refused with them.
#[cfg(all(feature = "postgres", feature = "audit-evm"))]
#[test]
fn replicas_anchor_only_through_a_contract() {
    let config = |contract: &str| {
        format!(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\n\
             url = \"postgres://broker@127.0.0.1:1/broker\"\nreplicas = true\n\
             [[audit.sinks]]\nkind = \"evm\"\nrpc_url = \"http://127.0.0.1:1\"\n\
             from = \"0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266\"\n{contract}"
        )
    };
    let (code, stderr) = serve_with_config(&config(""));
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("needs `contract`"), "{stderr}");
    // With a contract the settings hold: the start fails later, at the
    // database nobody listens for.
    let contract = "contract = \"0x5fbdb2315678afecb367f032d93f642f64180aa3\"";
    let (code, stderr) = serve_with_config(&config(contract));
    assert_eq!(code, 4, "{stderr}");
}

#[test]
fn a_storage_error_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    // The data directory is a file: nothing can be stored there.
    let data = dir.path().join("data");
    std::fs::write(&data, "not a directory").unwrap();
    let output = broker_command(&data, 0).output().unwrap();
    let (code, stderr) = one_line_failure(&output);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("data directory"), "{stderr}");
    // A store that cannot open when the others could: still one line, no
    // actor half-started and dropped in a panic.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("grants.redb")).unwrap();
    let output = off_test_database(&mut broker_command(&data, 0))
        .env("AGENTKEYS__LOG__FILTER", "error")
        .env("AGENTKEYS__STORAGE__BACKEND", "redb")
        .output()
        .unwrap();
    let (code, stderr) = one_line_failure(&output);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("storage"), "{stderr}");
}

/// `serve` on PostgreSQL at `url` (the settings' other values as shipped):
/// its exit code, its one line and how long it took.
fn serve_on_database(url: &str) -> (i32, String, std::time::Duration) {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let output = off_test_database(&mut broker_command(&dir.path().join("data"), 0))
        .env("AGENTKEYS__LOG__FILTER", "error")
        .env("AGENTKEYS__STORAGE__BACKEND", "postgres")
        .env("AGENTKEYS__STORAGE__POSTGRES__URL", url)
        .output()
        .unwrap();
    let (code, stderr) = one_line_failure(&output);
    (code, stderr, started.elapsed())
}

/// A database that refuses, or that takes the connection and never
/// answers, stops the start within the connect timeout (500 ms), in one
/// line that names where and why and no password; a section for a backend
/// not chosen, a database without a URL, or a `key=value` string in place
/// of one, is a configuration mistake.
#[test]
fn a_database_that_does_not_answer_exits_4_without_its_password() {
    let closed = crate::process::free_port();
    let url = format!("postgres://broker:hunter2-secret@127.0.0.1:{closed}/agentkeys");
    let (code, stderr, took) = serve_on_database(&url);
    assert!(!stderr.contains("hunter2"), "{stderr}");
    if !cfg!(feature = "postgres") {
        assert_eq!(code, 3, "{stderr}");
        assert!(stderr.contains("postgres feature"), "{stderr}");
        return;
    }
    assert_eq!(code, 4, "{stderr}");
    // Where, and the system's own reason.
    let at = format!("127.0.0.1:{closed}/agentkeys");
    assert!(
        stderr.contains(&at) && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // Takes the connection and never answers (a hung server).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://broker:hunter2-secret@127.0.0.1:{port}/agentkeys");
    let (code, stderr, took) = serve_on_database(&url);
    assert_eq!(code, 4, "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    drop(silent);

    let (code, stderr, _) =
        serve_on_database("host=127.0.0.1 user=broker password=hunter2-secret dbname=agentkeys");
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("postgres:// url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let (code, stderr) = serve_with_config("[storage.postgres]\nurl = \"postgres://h/db\"\n");
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("storage.backend is not"), "{stderr}");
    let (code, stderr) =
        serve_with_config("[storage]\nbackend = \"postgres\"\n[storage.postgres]\n");
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("needs a postgres:// url"), "{stderr}");
    let budget = "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://h/db\"\ncall_timeout_ms = 1000\n";
    let (code, stderr) = serve_with_config(budget);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("twice call_timeout_ms"), "{stderr}");
}

/// A broker built without the `otlp` feature does not silently drop the
/// trace export it was asked for.
#[cfg(not(feature = "otlp"))]
#[test]
fn an_otlp_endpoint_without_the_feature_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let output = broker_command(&dir.path().join("data"), 0)
        .env(
            "AGENTKEYS__LOG__OTLP_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces",
        )
        .output()
        .unwrap();
    let (code, stderr) = one_line_failure(&output);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("otlp feature"), "{stderr}");
}

/// A KMS signer that would give up after the signer pool (so a mint would
/// answer `overloaded`, not `signer_unavailable`), or one this build lacks:
/// a configuration error, before any call to KMS.
#[test]
fn a_kms_signer_slower_than_the_send_timeout_or_not_built_exits_3() {
    let kms =
        "[oidc]\nsigner = \"kms\"\n\n[oidc.kms]\nkey_id = \"alias/agentkeys\"\ntimeout_ms = 2000\n";
    let (code, stderr) = serve_with_config(kms);
    assert_eq!(code, 3, "{stderr}");
    let why = if cfg!(feature = "kms") {
        "oidc.kms.timeout_ms must be below actors.send_timeout_ms"
    } else {
        "built without the kms feature"
    };
    assert!(stderr.contains(why), "{stderr}");
}

/// An evm sink whose anchoring key cannot sign for its `from` (absent, or
/// another account's) stops the start with the key named (exit 4); one
/// that could never hold an anchor (`confirmations = 0`) is a mistake in
/// the config (exit 3). No chain is needed to tell.
#[cfg(feature = "audit-evm")]
#[test]
fn an_anchoring_key_that_cannot_sign_for_from_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let anchor_key = |flags: &[&str]| {
        std::process::Command::new(crate::process::BIN)
            .args(["audit", "anchor-key", "--data-dir"])
            .arg(&data)
            .arg("--sealing-key-file")
            .arg(crate::process::sealing_key_beside(&data))
            .args(flags)
            .output()
            .unwrap()
    };
    // No sealing key yet: made only when asked (a mistyped path must not
    // seal a funded key with a key the broker never reads).
    let refused = anchor_key(&[]);
    let (_, stderr) = one_line_failure(&refused);
    assert!(stderr.contains("no sealing key"), "{stderr}");
    assert!(!crate::process::sealing_key_beside(&data).exists());
    let made = anchor_key(&["--new-sealing-key"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    let sink = |from: &str, key: &str, confirmations: u64| {
        format!(
            "[[audit.sinks]]\nkind = \"evm\"\nrpc_url = \"http://127.0.0.1:9\"\nfrom = \"{from}\"\nkey_file = \"{key}\"\nconfirmations = {confirmations}\n"
        )
    };
    let serve = |config: String| {
        let file = dir.path().join("broker.toml");
        std::fs::write(&file, config).unwrap();
        let output = crate::process::broker_command(&data, 0)
            .args(["--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        one_line_failure(&output)
    };
    let someone = "0x70997970c51812dc3a010c7d01b50e0d17dc79c8";
    let (code, stderr) = serve(sink(someone, "evm-anchor.key", 12));
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("not of `from`"), "{stderr}");
    let (code, stderr) = serve(sink(someone, "missing.key", 12));
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("missing.key"), "{stderr}");
    let address = made["address"].as_str().unwrap();
    let (code, stderr) = serve(sink(address, "evm-anchor.key", 0));
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("confirmations"), "{stderr}");
}

/// One broker keeps a data directory's state, in redb's files or in a
/// PostgreSQL schema (whichever the suite runs on): a second broker started
/// on it exits 4, saying another broker has it and which one on
/// PostgreSQL, and the first keeps minting. Once the first stops, a broker
/// starts on the same state at once.
#[actix_web::test]
async fn a_second_broker_on_the_same_state_exits_4() {
    let run = crate::process::start_with_agent("first", 91, "only/").await;
    // The first broker's sink file (a required sink: written before the
    // mint answers), as if caught mid-write: the second must be refused
    // before its sinks repair their files.
    let minted = crate::process::mint_at(&run.base, &run.session, "only/x").await;
    assert_eq!(minted.status, reqwest::StatusCode::OK, "{}", minted.body);
    let jsonl = run.data.join("audit.jsonl");
    let written = std::fs::metadata(&jsonl).unwrap().len();
    let torn = b"{\"seq\": 99";
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&jsonl)
        .unwrap();
    std::io::Write::write_all(&mut file, torn).unwrap();
    let mut second = broker_command(&run.data, crate::process::free_port())
        .env("AGENTKEYS__LOG__FILTER", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Refused within the lock's wait, never left serving beside the first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            second.wait().unwrap();
            panic!("a second broker started on the first one's state");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, stderr) = one_line_failure(&second.wait_with_output().unwrap());
    assert_eq!(code, 4, "{stderr}");
    let now = std::fs::metadata(&jsonl).unwrap().len();
    assert_eq!(
        now,
        written + torn.len() as u64,
        "the sink's file untouched"
    );
    file.set_len(written).unwrap();
    if crate::helpers::TestDatabase::for_data_dir(&run.data).is_some() {
        let first = format!("pid {}", run.broker.id());
        assert!(
            stderr.contains("another broker writes") && stderr.contains(&first),
            "{stderr}"
        );
    } else {
        assert!(stderr.contains("another broker"), "{stderr}");
    }
    let minted = crate::process::mint_at(&run.base, &run.session, "only/x").await;
    assert_eq!(minted.status, reqwest::StatusCode::OK, "{}", minted.body);
    crate::process::stop_cleanly(run.broker);
    let port = crate::process::free_port();
    let mut next = crate::process::start_broker(&run.data, port);
    crate::process::wait_ready(&format!("http://127.0.0.1:{port}")).await;
    next.kill().unwrap();
    next.wait().unwrap();
}
