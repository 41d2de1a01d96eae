//! A deadline on every request body. actix-web's `client_request_timeout`
//! covers the head only: a client that sends a head announcing a body and
//! then nothing would hold its connection (and, at `max_connections`, the
//! broker) for as long as it liked. Each body now must arrive within
//! `server.request_body_timeout_ms` of its head, or reading it fails with
//! `408 request_timeout` and the connection is closed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;
use tokio::time::Sleep;

/// The text a timed-out body read carries, so the edge can tell it apart
/// from other I/O errors.
const TIMED_OUT: &str = "the request body did not arrive in time";

/// `payload`, failing once `limit` has passed.
pub fn with_deadline(payload: Payload, limit: Duration) -> Payload {
    Payload::Stream {
        payload: Box::pin(DeadlinePayload {
            inner: payload,
            deadline: Box::pin(tokio::time::sleep(limit)),
            expired: false,
        }),
    }
}

/// True when `error` is a body read that ran out of time.
pub fn timed_out(error: &PayloadError) -> bool {
    matches!(error, PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

struct DeadlinePayload {
    inner: Payload,
    deadline: Pin<Box<Sleep>>,
    expired: bool,
}

impl Stream for DeadlinePayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            let late = std::io::Error::new(std::io::ErrorKind::TimedOut, TIMED_OUT);
            return Poll::Ready(Some(Err(PayloadError::Io(late))));
        }
        Poll::Pending
    }
}
