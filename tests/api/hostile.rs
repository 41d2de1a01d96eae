//! Hostile input at the HTTP edge: random bodies, tokens, keys and proofs
//! on every route. Nothing panics, nothing answers 5xx, and every refusal is
//! a JSON error with a stable code.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::spawn_app_with;

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }

    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.next() % (max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Text that is often almost valid: JSON fragments, paths, hex.
    fn text(&mut self) -> String {
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            "\"",
            ":",
            ",",
            "service",
            "scope_path",
            "ttl_seconds",
            "audience",
            "s3",
            "bots/",
            "..",
            "/",
            "é",
            "\\u0000",
            "null",
            "-1",
            "1e309",
            "18446744073709551616",
            "true",
            "public_key",
            "nonce",
            "signature",
            "00",
            "ff",
            "name",
            "agent",
            " ",
            "\n",
        ];
        (0..self.next() % 24).map(|_| self.pick(&pieces)).collect()
    }

    fn token(&mut self) -> String {
        match self.next() % 4 {
            0 => String::from_utf8_lossy(&self.bytes(64)).into_owned(),
            1 => {
                let parts: Vec<String> = (0..3)
                    .map(|_| URL_SAFE_NO_PAD.encode(self.bytes(48)))
                    .collect();
                parts.join(".")
            }
            2 => format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
                URL_SAFE_NO_PAD.encode(self.text())
            ),
            _ => self.text(),
        }
    }
}

/// What an HTTP client can put in a header at all.
fn header_safe(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
        .collect()
}

#[actix_web::test]
async fn random_requests_on_every_route_never_get_a_5xx() {
    let app = spawn_app_with(|s| {
        s.rate_limit.per_second = 100_000;
        s.rate_limit.burst = 100_000;
    })
    .await;
    let agent = app.register_agent("target").await;
    let session = app.login(&agent).await;
    let routes = [
        "/v1/mint-oidc-jwt",
        "/v1/auth/challenge",
        "/v1/auth/verify",
        "/v1/admin/agents",
        "/v1/admin/grants",
        "/v1/admin/keys/rotate",
    ];
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600 {
        let route = noise.pick(&routes);
        let mut headers = Vec::new();
        let bearer = match noise.next() % 3 {
            0 => session.clone(),
            1 => noise.token(),
            _ => String::new(),
        };
        if !bearer.is_empty() {
            headers.push(("Authorization", format!("Bearer {}", header_safe(&bearer))));
        }
        if noise.one_in(2) {
            headers.push(("Content-Type", "application/json".to_owned()));
        }
        if noise.one_in(3) {
            headers.push(("Idempotency-Key", header_safe(&noise.text())));
        }
        if noise.one_in(3) {
            headers.push(("Agentkeys-Proof", header_safe(&noise.text())));
        }
        let body = if noise.one_in(2) {
            noise.text().into_bytes()
        } else {
            noise.bytes(200)
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = app
            .send_raw("POST", &app.url(route), &headers, Some(body.clone()))
            .await
            .expect("the broker answers");
        let (status, answer) = (reply.status, reply.body);
        assert!(
            !status.is_server_error(),
            "request {i} to {route} got {status}: {answer} (body {:?})",
            String::from_utf8_lossy(&body)
        );
        if !status.is_success() {
            assert!(
                answer["error"].is_string() && answer["message"].is_string(),
                "{route} {status}: {answer}"
            );
        }
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    eprintln!("600 hostile requests, answers by status: {statuses:?}");
    let health = app.get("/readyz", None).await;
    assert_eq!(health.status, StatusCode::OK, "still healthy afterwards");
}

/// Everything an admin request could change: the agents, the grants and
/// the key schedule, as the admin API shows them.
async fn admin_state(app: &crate::helpers::TestApp) -> [Value; 3] {
    let admin = Some(app.admin_token.as_str());
    [
        app.get("/v1/admin/agents", admin).await.body,
        app.get("/v1/admin/grants", admin).await.body,
        app.get("/v1/admin/keys", admin).await.body,
    ]
}

/// A JSON body for an admin route: the route's own valid template (most
/// of the time; another route's otherwise), with one field's value (or the
/// whole body) replaced by noise, so the parsers behind the admin token
/// see mostly-plausible input.
fn admin_body(noise: &mut Noise, route: u64, target_key: &str) -> Vec<u8> {
    let shape = if noise.one_in(4) {
        noise.next() % 4
    } else {
        route
    };
    let mut template = match shape {
        0 => serde_json::json!({ "name": "fuzz-agent", "public_key": target_key, "enabled": true }),
        1 => serde_json::json!({ "agent": "target", "service": "s3", "scope_path": "fuzz/",
                                  "max_uses": 3, "expires_at": null, "max_ttl_seconds": 60 }),
        2 => serde_json::json!({ "enabled": false }),
        _ => serde_json::json!({ "key": "session" }),
    };
    if noise.one_in(3) {
        return template.to_string().into_bytes();
    }
    let fields: Vec<String> = template.as_object().unwrap().keys().cloned().collect();
    let field = &fields[(noise.next() % fields.len() as u64) as usize];
    let replacement: Value = match noise.next() % 6 {
        0 => Value::String(noise.text()),
        1 => serde_json::from_str(&noise.text()).unwrap_or(Value::Null),
        2 => Value::from(noise.next() as i64),
        3 => Value::from(-(noise.next() as i64 % 1000)),
        4 => Value::Array(vec![Value::Bool(true)]),
        _ => return noise.text().into_bytes(),
    };
    template[field.as_str()] = replacement;
    if noise.one_in(5) {
        template["unexpected"] = Value::from(1);
    }
    template.to_string().into_bytes()
}

/// Hostile input behind the admin token: every admin route, its path
/// parameters and query strings, with bodies that are mostly plausible.
/// Nothing answers 5xx, every refusal is a JSON error, and refused
/// requests change nothing (the registry and the grants hold exactly what
/// the successful requests made).
#[actix_web::test]
async fn hostile_admin_requests_with_the_token_never_get_a_5xx_and_change_nothing_when_refused() {
    let app = spawn_app_with(|_| {}).await;
    app.register_agent("target").await;
    let target_key = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
            .verifying_key()
            .to_bytes(),
    );
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    let (mut agents, mut grants) = (1i64, 0i64);
    let mut statuses = std::collections::BTreeMap::new();
    let mut unsent = 0;
    for i in 0..500 {
        let before = admin_state(&app).await;
        let segment = match noise.next() % 4 {
            0 => "target".to_owned(),
            1 => "fuzz-agent".to_owned(),
            2 => header_safe(&noise.text()).replace(['/', '?', '#', ' '], ""),
            _ => format!("g_{}", hex::encode(noise.bytes(12))),
        };
        let query = header_safe(&noise.text()).replace(['#', ' '], "");
        let route = noise.next() % 9;
        let (method, path) = match route {
            0 => ("POST", "/v1/admin/agents".to_owned()),
            1 => ("PATCH", format!("/v1/admin/agents/{segment}")),
            // Never the target itself: grants are made for it.
            2 => (
                "DELETE",
                format!(
                    "/v1/admin/agents/{}",
                    segment.replace("target", "fuzz-agent")
                ),
            ),
            3 => ("POST", "/v1/admin/grants".to_owned()),
            4 => ("GET", format!("/v1/admin/grants?agent={query}")),
            5 => ("GET", format!("/v1/admin/grants/{segment}")),
            6 => ("DELETE", format!("/v1/admin/grants/{segment}")),
            7 => ("GET", format!("/v1/admin/audit?{query}")),
            _ => ("POST", "/v1/admin/keys/rotate".to_owned()),
        };
        // Templates: 0 new agent, 1 new grant, 2 agent update, 3 rotation.
        let shape = match route {
            0 => 0,
            1 => 2,
            3 => 1,
            8 => 3,
            _ => noise.next() % 4,
        };
        let body = admin_body(&mut noise, shape, &target_key);
        let authorization = format!("Bearer {}", app.admin_token);
        let headers = [
            ("Authorization", authorization.as_str()),
            ("Content-Type", "application/json"),
        ];
        let url = app.admin_url(&path);
        let Ok(reply) = app
            .send_raw(method, &url, &headers, Some(body.clone()))
            .await
        else {
            // A path the client itself refuses to send is not the broker's answer.
            unsent += 1;
            continue;
        };
        let (status, answer) = (reply.status, reply.body);
        assert!(
            !status.is_server_error(),
            "request {i}: {method} {path} got {status}: {answer} (body {:?})",
            String::from_utf8_lossy(&body)
        );
        if !status.is_success() {
            assert!(
                answer["error"].is_string() && answer["message"].is_string(),
                "{method} {path} {status}: {answer}"
            );
            assert!(
                admin_state(&app).await == before,
                "request {i}: {method} {path} was refused ({status}) but changed the state"
            );
        }
        match (method, path.as_str(), status.as_u16()) {
            ("POST", "/v1/admin/agents", 201) => agents += 1,
            ("DELETE", p, 204) if p.starts_with("/v1/admin/agents/") => agents -= 1,
            ("POST", "/v1/admin/grants", 201) => grants += 1,
            _ => {}
        }
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    eprintln!("500 hostile admin requests, answers by status: {statuses:?}, {unsent} not sendable");
    assert!(
        unsent < 50,
        "most requests reached the broker: {unsent} did not"
    );
    let admin = Some(app.admin_token.as_str());
    let listed = app.get("/v1/admin/agents", admin).await.body["agents"]
        .as_array()
        .unwrap()
        .len() as i64;
    assert_eq!(
        listed, agents,
        "agents: only the successful requests changed the registry"
    );
    let listed = app.get("/v1/admin/grants", admin).await.body["grants"]
        .as_array()
        .unwrap()
        .len() as i64;
    assert_eq!(
        listed, grants,
        "grants: only the successful requests made any"
    );
    assert!(
        statuses.contains_key(&201),
        "some requests created something: {statuses:?}"
    );
    assert!(
        statuses.contains_key(&400),
        "and many were refused: {statuses:?}"
    );
    assert_eq!(app.get("/readyz", None).await.status, StatusCode::OK);
}
