//! `RateLimitActor`: a GCRA limiter keyed by OmniAccount, checked before
//! the mint path touches any state.

use std::num::NonZeroU32;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::domain::OmniAccount;

/// The account is over its rate; it may retry after `retry_after`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rate limit exceeded, retry in {} s", retry_after.as_secs())]
pub struct RateLimited {
    pub retry_after: Duration,
}

/// Take one unit of `account`'s rate, or say when one will be free.
#[derive(Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct CheckRate {
    pub account: OmniAccount,
}

/// Tuning of the RateLimitActor, from config.
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// Sustained mints per second per account.
    pub per_second: NonZeroU32,
    /// Mints an idle account may make at once.
    pub burst: NonZeroU32,
    /// How often idle accounts are forgotten, which bounds memory.
    pub sweep_interval: Duration,
}

pub struct RateLimitActor {
    settings: RateLimitSettings,
    limiter: DefaultKeyedRateLimiter<OmniAccount>,
    clock: DefaultClock,
}

impl RateLimitActor {
    pub fn new(settings: RateLimitSettings) -> Self {
        let quota = Quota::per_second(settings.per_second).allow_burst(settings.burst);
        Self {
            settings,
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }
}

impl Actor for RateLimitActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.sweep_interval, |actor, _| {
            actor.limiter.retain_recent();
            actor.limiter.shrink_to_fit();
        });
    }
}

impl Handler<CheckRate> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    /// Retry-After is rounded up to whole seconds, at least one.
    fn handle(&mut self, msg: CheckRate, _: &mut Self::Context) -> Self::Result {
        self.limiter.check_key(&msg.account).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            RateLimited {
                retry_after: Duration::from_secs(wait.as_secs() + 1),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DevicePublicKey;

    fn account(seed: u8) -> OmniAccount {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
        OmniAccount::of_device_key(&DevicePublicKey::parse(&hex::encode(key.to_bytes())).unwrap())
    }

    #[actix::test]
    async fn an_account_over_its_burst_is_limited_and_another_is_not() {
        let addr = RateLimitActor::new(RateLimitSettings {
            mailbox_capacity: 16,
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
            sweep_interval: Duration::from_secs(60),
        })
        .start();
        for _ in 0..3 {
            addr.send(CheckRate {
                account: account(1),
            })
            .await
            .unwrap()
            .unwrap();
        }
        let limited = addr
            .send(CheckRate {
                account: account(1),
            })
            .await
            .unwrap();
        assert!(matches!(limited, Err(RateLimited { retry_after }) if retry_after.as_secs() >= 1));
        addr.send(CheckRate {
            account: account(2),
        })
        .await
        .unwrap()
        .unwrap();
    }
}
