//! With `log.otlp_endpoint` (feature `otlp`), request spans reach an
//! OpenTelemetry collector over OTLP/HTTP: here a small receiver in the
//! test, which records what the real broker process sends it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::process::{agent_with_grant, broker_command, call, free_port, wait_ready};

/// One request the receiver took: its path, content type and body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// An HTTP/1.1 server on a loopback port that answers every POST with
/// 200 `{}` and keeps what it was sent.
fn receiver() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Received = Arc::default();
    let kept = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let (mut length, mut content_type) = (0, String::new());
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap(),
                    "content-type" => content_type = value.trim().to_owned(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let path = request_line
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            kept.lock().unwrap().push((path, content_type, body));
            let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    (port, received)
}

/// Every span in OTLP/JSON `bodies`, with its resource's attributes.
fn spans(bodies: &[(String, String, Vec<u8>)]) -> Vec<(Value, Value)> {
    let mut found = Vec::new();
    for (_, _, body) in bodies {
        let Ok(export) = serde_json::from_slice::<Value>(body) else {
            continue;
        };
        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
            let spans = resource["scopeSpans"].as_array().into_iter().flatten();
            for span in spans.flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default()) {
                found.push((resource["resource"]["attributes"].clone(), span));
            }
        }
    }
    found
}

/// The string value of attribute `key` in an OTLP attribute list.
fn attribute<'a>(attributes: &'a Value, key: &str) -> Option<&'a str> {
    attributes.as_array()?.iter().find(|a| a["key"] == key)?["value"]["stringValue"].as_str()
}

/// Spans of a quiet broker (it logs only warnings) reach the collector
/// with their request id, method, route and outcome, the last ones sent when SIGTERM
/// stops it (the batch would otherwise wait a minute), and carry no token.
#[actix_web::test]
async fn request_spans_reach_an_otlp_collector_on_sigterm_with_no_secret() {
    let (collector, received) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut broker = broker_command(&dir.path().join("data"), port)
        .env(
            "AGENTKEYS__LOG__OTLP_ENDPOINT",
            format!("http://127.0.0.1:{collector}/v1/traces"),
        )
        .env("AGENTKEYS__LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&base).await;
    let admin = std::fs::read_to_string(dir.path().join("data/admin.token")).unwrap();
    let (session, _) = agent_with_grant(&base, admin.trim(), "traced", 93, "traces/").await;
    let minted = call(
        &base,
        "POST",
        "/v1/mint-oidc-jwt",
        Some(&session),
        Some(json!({ "service": "s3", "scope_path": "traces/" })),
    )
    .await
    .unwrap();
    let request_id = minted.headers["x-request-id"].to_str().unwrap().to_owned();
    let jwt = minted.body["jwt"].as_str().unwrap().to_owned();
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing sent before the batch delay or a stop"
    );

    let stopped = Command::new("kill")
        .args(["-TERM", &broker.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(broker.wait().unwrap().success(), "a clean stop");

    let received = received.lock().unwrap();
    let (resource, span) = spans(&received)
        .into_iter()
        .find(|(_, span)| attribute(&span["attributes"], "request_id") == Some(&request_id))
        .unwrap_or_else(|| {
            panic!(
                "no span with request_id {request_id} in {} posts",
                received.len()
            )
        });
    assert_eq!(span["name"], "request");
    assert_eq!(attribute(&span["attributes"], "method"), Some("POST"));
    assert_eq!(
        attribute(&span["attributes"], "route"),
        Some("/v1/mint-oidc-jwt")
    );
    assert_eq!(attribute(&span["attributes"], "outcome"), Some("ok"));
    assert_eq!(
        attribute(&resource, "service.name"),
        Some("agentkeys-broker")
    );
    let (path, content_type, _) = &received[0];
    assert_eq!(path, "/v1/traces");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    for (_, _, body) in received.iter() {
        let body = String::from_utf8_lossy(body);
        for (what, secret) in [
            ("session token", session.as_str()),
            ("JWT", jwt.as_str()),
            ("admin token", admin.trim()),
        ] {
            assert!(!body.contains(secret), "the {what} went to the collector");
        }
    }
}
