//! Hostile input at the HTTP edge: random bodies, tokens, keys and proofs
//! on every route. Nothing panics, nothing answers 5xx, and every refusal is
//! a JSON error with a stable code.

use actix_web::http::StatusCode;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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
    let client = awc::Client::default();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600 {
        let route = noise.pick(&routes);
        let mut request = client.post(app.url(route));
        let bearer = match noise.next() % 3 {
            0 => session.clone(),
            1 => noise.token(),
            _ => String::new(),
        };
        if !bearer.is_empty() {
            request = request
                .insert_header(("Authorization", format!("Bearer {}", header_safe(&bearer))));
        }
        if noise.one_in(2) {
            request = request.insert_header(("Content-Type", "application/json"));
        }
        if noise.one_in(3) {
            request = request.insert_header(("Idempotency-Key", header_safe(&noise.text())));
        }
        if noise.one_in(3) {
            request = request.insert_header(("Agentkeys-Proof", header_safe(&noise.text())));
        }
        let body = if noise.one_in(2) {
            noise.text().into_bytes()
        } else {
            noise.bytes(200)
        };
        let mut response = request
            .send_body(body.clone())
            .await
            .expect("the broker answers");
        let status = response.status();
        let answer: Value =
            serde_json::from_slice(&response.body().await.unwrap()).unwrap_or_default();
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
