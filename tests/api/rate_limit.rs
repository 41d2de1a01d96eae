use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app_with;

#[actix_web::test]
async fn a_burst_over_the_rate_gets_429_with_retry_after_and_another_account_is_unaffected() {
    let app = spawn_app_with(|s| {
        s.grants.required = false;
        s.rate_limit.per_second = 1;
        s.rate_limit.burst = 3;
    })
    .await;
    let greedy = app.register_agent("greedy").await;
    let calm = app.register_agent("calm").await;
    let greedy_session = app.login(&greedy).await;
    let calm_session = app.login(&calm).await;

    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(app.mint(&greedy_session, &json!({})).await);
    }
    let ok = statuses
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(ok, 3, "the burst allows exactly three");
    let limited = statuses.last().unwrap();
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.error_code(), "rate_limited");
    let retry_after: u64 = limited
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        retry_after, 1,
        "one mint a second: the next within the second"
    );

    let other = app.mint(&calm_session, &json!({})).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);

    // Waiting as told is enough.
    actix_web::rt::time::sleep(std::time::Duration::from_secs(retry_after)).await;
    let after = app.mint(&greedy_session, &json!({})).await;
    assert_eq!(
        after.status,
        StatusCode::OK,
        "after Retry-After: {}",
        after.body
    );
}
