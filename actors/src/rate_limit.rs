//! `RateLimitActor`: GCRA limiters keyed by OmniAccount (checked before
//! the mint path touches any state) and by client network (the
//! unauthenticated login endpoints, and refused mint sessions). A client
//! network is an IPv4 address or an IPv6 /64: one host is handed a whole
//! /64, so keying on full IPv6 addresses would give it 2^64 budgets.

use std::net::{IpAddr, Ipv6Addr};
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

/// Take one unit of `account`'s rate (the owner's, shared by its
/// agents) and, when a per-agent limit is set, of `agent`'s own; or say
/// when one will be free.
#[derive(Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct CheckRate {
    pub account: OmniAccount,
    pub agent: OmniAccount,
}

/// Take one unit of a client IP's login rate.
#[derive(Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct CheckLoginRate {
    pub ip: IpAddr,
}

/// Take one unit of a client network's budget of mint attempts whose
/// session was refused.
#[derive(Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct CheckUnauthenticated {
    pub ip: IpAddr,
}

/// The key a client address is limited by: an IPv4 address (also when
/// written as an IPv4-mapped IPv6 address), or an IPv6 address's /64.
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// `wait` rounded up to whole seconds, at least one: `Retry-After` is in
/// whole seconds, and a client that waits that long must find a unit free.
pub fn whole_seconds_up(wait: Duration) -> Duration {
    let up = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Duration::from_secs(up.max(1))
}

/// Replicas on one database (`storage.postgres.replicas`) split every
/// budget evenly among those alive: this one keeps `1/replicas` of each
/// rate and of each burst (rounded up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShareBudgets {
    pub replicas: NonZeroU32,
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
    /// Sustained mints per second and burst of one agent, within its
    /// account's; `None`: agents share their account's budget freely.
    pub per_agent: Option<(NonZeroU32, NonZeroU32)>,
    /// Login requests per second per client network.
    pub login_per_second: NonZeroU32,
    pub login_burst: NonZeroU32,
    /// Mint attempts with a refused session, per second per client
    /// network; past it they get 429 instead of 401.
    pub unauthenticated_per_second: NonZeroU32,
    pub unauthenticated_burst: NonZeroU32,
    /// How often idle accounts are forgotten, which bounds memory.
    pub sweep_interval: Duration,
}

pub struct RateLimitActor {
    settings: RateLimitSettings,
    /// Replicas sharing the budgets (1: this broker alone).
    replicas: NonZeroU32,
    limiter: DefaultKeyedRateLimiter<OmniAccount>,
    agent_limiter: Option<DefaultKeyedRateLimiter<OmniAccount>>,
    login_limiter: DefaultKeyedRateLimiter<IpAddr>,
    unauthenticated_limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl RateLimitActor {
    pub fn new(settings: RateLimitSettings) -> Self {
        Self::sharing(settings, NonZeroU32::MIN)
    }

    /// Limiters holding `1/replicas` of each budget, every key fresh.
    fn sharing(settings: RateLimitSettings, replicas: NonZeroU32) -> Self {
        let share = |per_second: NonZeroU32, burst: NonZeroU32| {
            let period = Duration::from_secs_f64(replicas.get() as f64 / per_second.get() as f64);
            let burst = NonZeroU32::new(burst.get().div_ceil(replicas.get()));
            Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(per_second))
                .allow_burst(burst.unwrap_or(NonZeroU32::MIN))
        };
        let quota = share(settings.per_second, settings.burst);
        let login_quota = share(settings.login_per_second, settings.login_burst);
        let unauthenticated_quota = share(
            settings.unauthenticated_per_second,
            settings.unauthenticated_burst,
        );
        let agent_limiter = (settings.per_agent)
            .map(|(per_second, burst)| RateLimiter::keyed(share(per_second, burst)));
        Self {
            settings,
            replicas,
            limiter: RateLimiter::keyed(quota),
            agent_limiter,
            login_limiter: RateLimiter::keyed(login_quota),
            unauthenticated_limiter: RateLimiter::keyed(unauthenticated_quota),
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
            retry_after: whole_seconds_up(not_until.wait_time_from(self.clock.now())),
        })
    }
}

impl RateLimitActor {
    fn tracked_keys(&self) -> usize {
        self.limiter.len()
            + self.agent_limiter.as_ref().map_or(0, |l| l.len())
            + self.login_limiter.len()
            + self.unauthenticated_limiter.len()
    }
}

impl Actor for RateLimitActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        // Served from the start (as 0), not only after the first sweep.
        metrics::gauge!("agentkeys_rate_limit_keys").set(self.tracked_keys() as f64);
        ctx.run_interval(self.settings.sweep_interval, |actor, _| {
            actor.limiter.retain_recent();
            actor.limiter.shrink_to_fit();
            if let Some(agents) = &actor.agent_limiter {
                agents.retain_recent();
                agents.shrink_to_fit();
            }
            actor.login_limiter.retain_recent();
            actor.login_limiter.shrink_to_fit();
            actor.unauthenticated_limiter.retain_recent();
            actor.unauthenticated_limiter.shrink_to_fit();
            metrics::gauge!("agentkeys_rate_limit_keys").set(actor.tracked_keys() as f64);
        });
    }
}

impl Handler<CheckRate> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    /// The agent's own limit first, so an agent over it spends none of
    /// its account's budget.
    fn handle(&mut self, msg: CheckRate, _: &mut Self::Context) -> Self::Result {
        if let Some(agents) = &self.agent_limiter {
            self.take(agents, &msg.agent)?;
        }
        self.take(&self.limiter, &msg.account)
    }
}

impl Handler<ShareBudgets> for RateLimitActor {
    type Result = ();

    /// When the replicas alive changed: every key starts afresh on its
    /// new share (a burst more at most, once per change).
    fn handle(&mut self, msg: ShareBudgets, _: &mut Self::Context) {
        if msg.replicas != self.replicas {
            tracing::info!(
                replicas = msg.replicas,
                "rate budgets split among the replicas alive"
            );
            *self = Self::sharing(self.settings.clone(), msg.replicas);
        }
    }
}

impl Handler<TrackedKeys> for RateLimitActor {
    type Result = usize;

    fn handle(&mut self, _: TrackedKeys, _: &mut Self::Context) -> Self::Result {
        self.tracked_keys()
    }
}

impl Handler<CheckLoginRate> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    fn handle(&mut self, msg: CheckLoginRate, _: &mut Self::Context) -> Self::Result {
        self.take(&self.login_limiter, &client_network(msg.ip))
    }
}

impl Handler<CheckUnauthenticated> for RateLimitActor {
    type Result = Result<(), RateLimited>;

    fn handle(&mut self, msg: CheckUnauthenticated, _: &mut Self::Context) -> Self::Result {
        self.take(&self.unauthenticated_limiter, &client_network(msg.ip))
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

    fn one(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    /// One of everything per second, no per-agent limit: each test sets
    /// what it measures on top.
    fn settings() -> RateLimitSettings {
        RateLimitSettings {
            mailbox_capacity: 16,
            per_second: one(1),
            burst: one(1),
            per_agent: None,
            login_per_second: one(1),
            login_burst: one(1),
            unauthenticated_per_second: one(1),
            unauthenticated_burst: one(1),
            sweep_interval: Duration::from_secs(60),
        }
    }

    /// Replicas keep an even share of each burst (rounded up), and
    /// every key starts afresh when the count changes.
    #[actix::test]
    async fn replicas_alive_share_each_burst() {
        let addr = RateLimitActor::new(RateLimitSettings {
            burst: one(5),
            ..settings()
        })
        .start();
        let burst = |seed: u8| {
            let addr = addr.clone();
            async move {
                let mut taken = 0;
                while taken < 10 {
                    let check = CheckRate {
                        account: account(seed),
                        agent: account(seed),
                    };
                    if addr.send(check).await.unwrap().is_err() {
                        break;
                    }
                    taken += 1;
                }
                taken
            }
        };
        assert_eq!(burst(1).await, 5, "alone: the whole burst");
        addr.send(ShareBudgets { replicas: one(2) }).await.unwrap();
        assert_eq!(burst(1).await, 3, "afresh, on half the burst rounded up");
        addr.send(ShareBudgets { replicas: one(3) }).await.unwrap();
        assert_eq!(burst(2).await, 2);
    }

    #[actix::test]
    async fn an_account_over_its_burst_is_limited_and_another_is_not() {
        let addr = RateLimitActor::new(RateLimitSettings {
            burst: one(3),
            ..settings()
        })
        .start();
        for _ in 0..3 {
            addr.send(CheckRate {
                account: account(1),
                agent: account(1),
            })
            .await
            .unwrap()
            .unwrap();
        }
        let limited = addr
            .send(CheckRate {
                account: account(1),
                agent: account(1),
            })
            .await
            .unwrap();
        // One unit a second: the next is free within the second.
        assert_eq!(
            limited,
            Err(RateLimited {
                retry_after: Duration::from_secs(1)
            })
        );
        addr.send(CheckRate {
            account: account(2),
            agent: account(2),
        })
        .await
        .unwrap()
        .unwrap();
    }

    /// With a per-agent limit, an agent over its own spends none of its
    /// account's budget, and the account's still binds all its agents.
    #[actix::test]
    async fn an_agent_over_its_own_limit_leaves_its_accounts_budget_to_the_others() {
        let addr = RateLimitActor::new(RateLimitSettings {
            burst: one(3),
            per_agent: Some((one(1), one(2))),
            ..settings()
        })
        .start();
        let check = |agent: u8| CheckRate {
            account: account(9),
            agent: account(agent),
        };
        let mut answers = Vec::new();
        for agent in [1, 1, 1, 2, 2] {
            answers.push(addr.send(check(agent)).await.unwrap().is_ok());
        }
        assert_eq!(answers, [true, true, false, true, false]);
    }

    #[test]
    fn retry_after_is_the_wait_rounded_up_to_whole_seconds() {
        let secs = |ms| whole_seconds_up(Duration::from_millis(ms)).as_secs();
        assert_eq!(
            [
                secs(0),
                secs(1),
                secs(999),
                secs(1000),
                secs(1001),
                secs(2500)
            ],
            [1, 1, 1, 1, 2, 3]
        );
    }

    /// Review (suspected): the login limit keyed on the full address, so
    /// one IPv6 host had a budget per address of its /64.
    #[test]
    fn an_ipv6_64_is_one_client_network_and_ipv4_is_its_own_address() {
        let net = |text: &str| client_network(text.parse().unwrap());
        assert_eq!(
            net("2001:db8:1:2::1"),
            net("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_ne!(net("2001:db8:1:2::1"), net("2001:db8:1:3::1"));
        assert_eq!(net("::ffff:192.0.2.7"), net("192.0.2.7"));
        assert_ne!(net("192.0.2.7"), net("192.0.2.8"));
    }

    #[actix::test]
    async fn logins_from_one_ipv6_64_share_one_budget() {
        let addr = RateLimitActor::new(RateLimitSettings {
            login_burst: one(2),
            ..settings()
        })
        .start();
        let login = |host: u16| CheckLoginRate {
            ip: format!("2001:db8::{host:x}").parse().unwrap(),
        };
        assert!(addr.send(login(1)).await.unwrap().is_ok());
        assert!(addr.send(login(2)).await.unwrap().is_ok());
        assert!(
            addr.send(login(3)).await.unwrap().is_err(),
            "a third address of the same /64 is over the shared burst"
        );
        let elsewhere = CheckLoginRate {
            ip: "2001:db8:0:1::1".parse().unwrap(),
        };
        assert!(addr.send(elsewhere).await.unwrap().is_ok());
    }

    #[actix::test]
    async fn idle_accounts_are_forgotten_so_memory_stays_bounded() {
        let addr = RateLimitActor::new(RateLimitSettings {
            mailbox_capacity: 100_000,
            // One mint (one per second) marks an account for a second;
            // then it is idle until the next sweep.
            sweep_interval: Duration::from_millis(300),
            ..settings()
        })
        .start();
        for i in 0..5_000u32 {
            let account = OmniAccount::for_tests(&format!("{i:064}"));
            addr.send(CheckRate {
                account: account.clone(),
                agent: account,
            })
            .await
            .unwrap()
            .unwrap();
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
