//! What a copy of the data directory yields (review finding 2): the
//! directory is owner-only, and what could be used if stolen (stored
//! replay answers, private keys) is sealed with a key kept elsewhere.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agentkeys_broker::startup::{Application, StartupError};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{on_redb, spawn_app_with};

/// Every file under `dir`, with its mode.
fn files_with_modes(dir: &Path, found: &mut Vec<(std::path::PathBuf, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            files_with_modes(&path, found);
        } else {
            found.push((path, mode));
        }
    }
}

/// The ways a secret could sit in a file: as text, and as the JSON array
/// of numbers that serde writes for bytes.
fn encodings(secret: &str) -> [String; 2] {
    let head = &secret.as_bytes()[..24];
    let numbers = serde_json::to_string(head).unwrap();
    [
        secret.to_owned(),
        numbers.trim_matches(['[', ']']).to_owned(),
    ]
}

#[actix_web::test]
async fn the_data_directory_is_owner_only_and_holds_no_live_jwt_or_private_key() {
    // The admin token is kept elsewhere, as the runbook says to in
    // production (by default it is generated in the data directory).
    let app = spawn_app_with(|s| {
        // The data directory's files (PostgreSQL seals its stored answers
        // the same way: tests/api/store_contract.rs).
        on_redb(s);
        let token = s.storage.data_dir.parent().unwrap().join("admin.token");
        std::fs::write(&token, "an-admin-token-kept-elsewhere\n").unwrap();
        s.admin.token_file = Some(token);
    })
    .await;
    let agent = app.register_agent("at-rest").await;
    app.grant(&agent, "s3", "rest/", None).await;
    let session = app.login(&agent).await;
    let body = json!({ "service": "s3", "scope_path": "rest/x/" });
    let first = app.mint_with_key(&session, "kept-for-replay", &body).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let jwt = first.body["jwt"].as_str().unwrap().to_owned();
    let app = app.restart();

    let mode = std::fs::metadata(app.data_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the data directory");
    let mut files = Vec::new();
    files_with_modes(app.data_dir(), &mut files);
    assert!(files.len() >= 5, "{files:?}");
    let secrets = [
        ("the live JWT", encodings(&jwt)),
        (
            "the JWT's signature",
            encodings(jwt.rsplit('.').next().unwrap()),
        ),
        ("the admin token", encodings(&app.admin_token)),
    ];
    for (path, mode) in &files {
        assert_eq!(*mode, 0o600, "{}", path.display());
        let bytes = std::fs::read(path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for (what, forms) in &secrets {
            for form in forms {
                assert!(
                    !text.contains(form.as_str()),
                    "{} holds {what}",
                    path.display()
                );
            }
        }
    }
    let ring = std::fs::read_to_string(app.data_file("keyring.json")).unwrap();
    assert!(!ring.contains("\"pkcs8\""), "plain private keys: {ring}");

    let replay = app.mint_with_key(&session, "kept-for-replay", &body).await;
    assert_eq!(
        replay.raw, first.raw,
        "the sealed answer opens after a restart"
    );
}

#[actix_web::test]
async fn a_wide_data_directory_is_tightened_and_a_readable_or_misplaced_sealing_key_is_refused() {
    let mut app = spawn_app_with(on_redb).await;
    app.stop();
    let mut settings = app.settings.clone();
    let data = settings.storage.data_dir.clone();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("grants.redb"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let key = settings.secrets.sealing_key_file.clone();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = Application::build(settings.clone()).await.err();
    assert!(
        matches!(refused, Some(StartupError::Sealing(_))),
        "{refused:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut inside = settings.clone();
    inside.secrets.sealing_key_file = data.join("sealing.key");
    let refused = Application::build(inside).await.err();
    assert!(
        matches!(refused, Some(StartupError::Sealing(_))),
        "{refused:?}"
    );

    settings.server.bind = "127.0.0.1:0".into();
    let started = Application::build(settings).await;
    assert!(started.is_ok());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("grants.redb")), 0o600);
}
