//! Liveness and readiness probes, on every listener.

use actix_web::{get, web, HttpResponse};
use serde_json::json;

use agentkeys_actors::audit::{AuditError, CheckLedger};

use crate::error::with_causes;
use crate::startup::BrokerState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz).service(readyz);
}

/// The process is up and serving HTTP.
#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Every actor of the mint path is running, the OIDC signer signs and the
/// audit ledger answers (a token, KMS or a database can be away while every
/// actor runs): `signer_unavailable` and `storage_unavailable` say why when
/// they do not.
#[get("/readyz")]
async fn readyz(state: web::Data<BrokerState>) -> HttpResponse {
    let p = &state.actors;
    let actors = [
        ("auth", p.auth.connected()),
        ("rate_limit", p.rate_limit.connected()),
        ("grants", p.grants.connected()),
        ("signer", p.signer.connected()),
        ("audit", p.audit.connected()),
    ];
    let running = actors.iter().all(|(_, up)| *up);
    let (signer, ledger) = if running {
        let ledger = async {
            match p.audit.ask(CheckLedger).await {
                Ok(answer) => {
                    answer.map_err(|e| (matches!(e, AuditError::Superseded), e.to_string()))
                }
                Err(overloaded) => Err((false, overloaded.to_string())),
            }
        };
        futures_util::future::join(p.signer.signer_ready(), ledger).await
    } else {
        (Ok(()), Ok(()))
    };
    let ready = running && signer.is_ok() && ledger.is_ok();
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "actors": actors.iter().map(|(n, up)| (n.to_string(), json!(up))).collect::<serde_json::Map<_, _>>(),
    });
    if let Err(down) = signer {
        // The cause names keys, accounts and endpoints: the log has it.
        tracing::warn!(cause = %with_causes(&down), "not ready: the OIDC signer does not sign");
        body["signer_unavailable"] = json!(format!(
            "the {} does not sign; the broker's log says why",
            down.signer()
        ));
    }
    if let Err((superseded, cause)) = ledger {
        // The cause may name the database's host: the log has it.
        match superseded {
            true => tracing::warn!("not ready: another broker took over this broker's database"),
            false => tracing::warn!(cause = %cause, "not ready: the audit ledger does not answer"),
        }
        body["storage_unavailable"] = json!(if superseded {
            "another broker took over this broker's database: this one writes nothing more; stop it"
        } else {
            "the audit ledger's storage does not answer; the broker's log says why"
        });
    }
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
