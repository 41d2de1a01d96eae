//! `RateLimitActor`: GCRA limiters keyed by OmniAccount (checked before
//! the mint path touches any state) and by client IP (the unauthenticated
//! login endpoints).

use std::net::IpAddr;
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

/// Take one unit of a client IP's login rate.
#[derive(Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct CheckLoginRate {
    pub ip: IpAddr,
}

/// How many accounts and addresses the limiters hold now.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct TrackedKeys;

/// Tuning of the RateLimitActor, from config.
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    /// Bound of the mailbox; beyond it senders wait, then get 503.
    pub mailbox_capacity: usize,
    /// Sustained mints per second per account.
    pub per_second: NonZeroU32,
    /// Mints an idle account may make at once.
    pub burst: NonZeroU32,
    /// Login requests per second per client IP.
    pub login_per_second: NonZeroU32,
    pub login_burst: NonZeroU32,
    /// How often idle accounts are forgotten, which bounds memory.
    pub sweep_interval: Duration,
}

pub struct RateLimitActor {
    settings: RateLimitSettings,
    limiter: DefaultKeyedRateLimiter<OmniAccount>,
    login_limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl RateLimitActor {
    pub fn new(settings: RateLimitSettings) -> Self {
        let quota = Quota::per_second(settings.per_second).allow_burst(settings.burst);
        let login_quota =
            Quota::per_second(settings.login_per_second).allow_burst(settings.login_burst);
        Self {
            settings,
            limiter: RateLimiter::keyed(quota),
            login_limiter: RateLimiter::keyed(login_quota),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one unit for `key`, or says when one will be free (rounded up
    /// to whole seconds, at least one).
    fn take<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
    ) -> Result<(), RateLimited> {
        limiter.check_key(key).map_err(|not_until| RateLimited {
            retry_after: Duration::from_secs(
                not_until.wait_time_from(self.clock.now()).as_secs() + 1,
            ),
        })
    }
}

impl Actor for RateLimitActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        ctx.run_interval(self.settings.sweep_interval, |actor, _| {
            actor.limiter.retain_recent();
            actor.limiter.shrink_to_fit();
            actor.login_limiter.retain_recent();
            actor.login_limiter.shrink_to_fit();
            metrics::gauge!("agentkeys_rate_limit_keys")
                .set((actor.limiter.len() + actor.login_limiter.len()) as f64);
        });
    }
}

impl Handler<CheckRate> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    fn handle(&mut self, msg: CheckRate, _: &mut Self::Context) -> Self::Result {
        self.take(&self.limiter, &msg.account)
    }
}

impl Handler<TrackedKeys> for RateLimitActor {
    type Result = usize;

    fn handle(&mut self, _: TrackedKeys, _: &mut Self::Context) -> Self::Result {
        self.limiter.len() + self.login_limiter.len()
    }
}

impl Handler<CheckLoginRate> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    fn handle(&mut self, msg: CheckLoginRate, _: &mut Self::Context) -> Self::Result {
        self.take(&self.login_limiter, &msg.ip)
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
            login_per_second: NonZeroU32::new(1).unwrap(),
            login_burst: NonZeroU32::new(1).unwrap(),
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

    #[actix::test]
    async fn idle_accounts_are_forgotten_so_memory_stays_bounded() {
        let addr = RateLimitActor::new(RateLimitSettings {
            mailbox_capacity: 100_000,
            // One mint marks an account for a second; then it is idle.
            per_second: NonZeroU32::new(1).unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
            login_per_second: NonZeroU32::new(1).unwrap(),
            login_burst: NonZeroU32::new(1).unwrap(),
            sweep_interval: Duration::from_millis(300),
        })
        .start();
        for i in 0..5_000u32 {
            let account = OmniAccount::for_tests(&format!("{i:064}"));
            addr.send(CheckRate { account }).await.unwrap().unwrap();
        }
        assert!(
            addr.send(TrackedKeys).await.unwrap() >= 4_000,
            "the accounts are tracked while active"
        );
        // GCRA state is indistinguishable from fresh two emission intervals on.
        actix::clock::sleep(Duration::from_millis(2600)).await;
        assert_eq!(
            addr.send(TrackedKeys).await.unwrap(),
            0,
            "idle accounts were swept"
        );
    }
}
