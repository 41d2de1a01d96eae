//! The binary's admin commands, run as real processes against a real broker.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{spawn_app, TestApp};

/// Runs the broker binary's `args` against `app`: its admin listener and
/// its test CA, when it has them.
pub fn broker_cli(app: &TestApp, args: &[&str]) -> (bool, Value, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"));
    command
        .args(args)
        .env("AGENTKEYS_BROKER_URL", &app.address)
        .env("AGENTKEYS_ADMIN_TOKEN_FILE", app.data_file("admin.token"));
    if let Some(admin) = &app.admin_address {
        command.env("AGENTKEYS_ADMIN_URL", admin);
    }
    if let Some(ca_file) = app.ca_file() {
        command.env("AGENTKEYS_CA_FILE", ca_file);
    }
    let output = command.output().expect("the binary runs");
    let stdout = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (
        output.status.success(),
        stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[actix_web::test]
async fn agent_and_grant_commands_drive_the_admin_api() {
    let app = spawn_app().await;
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let public_key = hex::encode(key.verifying_key().to_bytes());

    let (ok, added, _) = broker_cli(
        &app,
        &["agent", "add", "cli-bot", "--public-key", &public_key],
    );
    assert!(ok);
    assert_eq!(added["name"], "cli-bot");
    let (ok, granted, _) = broker_cli(
        &app,
        &[
            "grant",
            "add",
            "--agent",
            "cli-bot",
            "--service",
            "s3",
            "--scope",
            "cli/",
            "--max-uses",
            "2",
        ],
    );
    assert!(ok);
    assert_eq!(granted["max_uses"], 2);
    let id = granted["id"].as_str().unwrap().to_owned();

    let (_, listed, _) = broker_cli(&app, &["grant", "list", "--agent", "cli-bot"]);
    assert_eq!(listed["grants"][0]["id"], id.as_str());
    let (ok, revoked, _) = broker_cli(&app, &["grant", "revoke", &id]);
    assert!(ok);
    assert_eq!(revoked["revoked"], true);

    let (_, agents, _) = broker_cli(&app, &["agent", "list"]);
    assert_eq!(agents["agents"][0]["public_key"], public_key.as_str());
    let (ok, disabled, _) = broker_cli(&app, &["agent", "disable", "cli-bot"]);
    assert!(ok);
    assert_eq!(disabled["enabled"], false);

    let (ok, _, _) = broker_cli(&app, &["agent", "remove", "cli-bot"]);
    assert!(ok);

    let (ok, rotated, _) = broker_cli(&app, &["keys", "rotate"]);
    assert!(ok);
    assert_eq!(rotated["kind"], "oidc");
    let (_, keys, _) = broker_cli(&app, &["keys", "list"]);
    let oidc = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kind"] == "oidc")
        .count();
    assert_eq!(oidc, 2, "the rotated key is listed beside the current one");

    let (ok, _, stderr) = broker_cli(&app, &["agent", "remove", "cli-bot"]);
    assert!(!ok, "removing a missing agent fails");
    assert!(stderr.contains("not_found"), "{stderr}");
    let (ok, _, stderr) = broker_cli(
        &app,
        &[
            "grant",
            "add",
            "--agent",
            "ghost",
            "--service",
            "s3",
            "--scope",
            "x/",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("404"), "{stderr}");
}

/// `--version` names the build's commit; completions and the man page come
/// from the same command definitions (issue 17).
#[test]
fn the_binary_names_its_commit_and_writes_completions_and_a_man_page() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_agentkeys-broker"))
            .args(args)
            .output()
            .expect("the binary runs");
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let version = run(&["--version"]);
    let expected = format!("agentkeys-broker {} (", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&expected), "{version}");
    let sha = version
        .trim()
        .trim_end_matches(')')
        .rsplit('(')
        .next()
        .unwrap();
    let hex = sha.len() == 12 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    // A tree without git may say "unknown"; CI builds from a clone.
    assert!(
        hex || (sha == "unknown" && std::env::var_os("CI").is_none()),
        "{version}"
    );
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_agentkeys__broker()") && bash.contains("serve"),
        "{bash}"
    );
    let man = run(&["manpage"]);
    assert!(man.contains(".TH agentkeys-broker"), "{man}");
    let help = run(&["--help"]);
    assert!(
        help.contains("Exit codes") && help.contains("5 cannot listen"),
        "{help}"
    );
}
