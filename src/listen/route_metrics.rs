//! Requests per route and status, and their latency per route
//! (`agentkeys_http_requests_total`, `agentkeys_http_request_seconds`).
//!
//! A metric's handle is found by building its key (labels, hash) and
//! looking it up in the recorder's registry: more work than the count
//! itself. Each HTTP worker thread finds a route's handles once and keeps
//! them; its routes and statuses are few.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use metrics::{Counter, Histogram};

/// One route's handles on this thread.
struct RouteHandles {
    latency: Histogram,
    /// By status; a route answers with a handful.
    answered: Vec<(StatusCode, Counter)>,
}

thread_local! {
    static ROUTES: RefCell<HashMap<String, RouteHandles>> = RefCell::new(HashMap::new());
}

/// Counts one answer of `route` with `status`, which took `elapsed`.
pub fn record(route: &str, status: StatusCode, elapsed: Duration) {
    ROUTES.with_borrow_mut(|routes| {
        if !routes.contains_key(route) {
            let latency =
                metrics::histogram!("agentkeys_http_request_seconds", "route" => route.to_owned());
            let handles = RouteHandles {
                latency,
                answered: Vec::new(),
            };
            routes.insert(route.to_owned(), handles);
        }
        let handles = routes.get_mut(route).expect("inserted above");
        handles.latency.record(elapsed.as_secs_f64());
        let counter = match handles.answered.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter,
            None => {
                let counter = metrics::counter!("agentkeys_http_requests_total",
                    "route" => route.to_owned(), "status" => status.as_u16().to_string());
                handles.answered.push((status, counter));
                &handles.answered.last().expect("pushed above").1
            }
        };
        counter.increment(1);
    });
}
