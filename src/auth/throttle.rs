//! Throttling of failed authentication, per client address. A key that is
//! unknown or revoked costs a database lookup and tells a guesser nothing,
//! so an address that fails `limit` times within `window` is refused for a
//! `window` from its last counted failure, before any lookup. A success does
//! not clear the count (a guesser holding one valid key could otherwise
//! reset it between guesses); failures simply age out with the window, so a
//! legitimate client behind the same address waits at most one window.
//!
//! Addresses are counted as seen by the server: behind a reverse proxy every
//! client shares the proxy's address. IPv6 clients are counted per /64,
//! the block one host usually holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked before expired entries are pruned.
const PRUNE_AT: usize = 4096;

/// Failures of one address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// When the first failure still counted happened.
    since: Instant,
    /// Refused until then.
    blocked_until: Option<Instant>,
}

/// Failed attempts of every address seen recently.
pub struct FailedAuthThrottle {
    limit: u32,
    window: Duration,
    addresses: Mutex<HashMap<IpAddr, Failures>>,
}

impl FailedAuthThrottle {
    /// A throttle, or `None` when `limit` or `window` is 0 (no throttling).
    pub fn new(limit: u32, window: Duration) -> Option<Self> {
        (limit > 0 && !window.is_zero()).then(|| Self {
            limit,
            window,
            addresses: Mutex::new(HashMap::new()),
        })
    }

    /// How long `address` must still wait, if it is refused now.
    pub fn check(&self, address: IpAddr) -> Result<(), Duration> {
        self.check_at(counted(address), Instant::now())
    }

    /// Counts a failed attempt from `address`.
    pub fn record_failure(&self, address: IpAddr) {
        self.record_failure_at(counted(address), Instant::now());
    }

    fn check_at(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        let addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        match addresses.get(&address).and_then(|f| f.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    fn record_failure_at(&self, address: IpAddr, now: Instant) {
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if addresses.len() >= PRUNE_AT && !addresses.contains_key(&address) {
            addresses.retain(|_, f| !self.expired(f, now));
        }
        let failures = addresses.entry(address).or_insert(Failures {
            count: 0,
            since: now,
            blocked_until: None,
        });
        if self.expired(failures, now) {
            *failures = Failures {
                count: 0,
                since: now,
                blocked_until: None,
            };
        }
        failures.count += 1;
        if failures.count >= self.limit {
            failures.blocked_until = Some(now + self.window);
            // The next block needs `limit` fresh failures.
            failures.count = 0;
            failures.since = now;
        }
    }

    /// Whether an entry neither blocks nor holds a failure still counted.
    fn expired(&self, failures: &Failures, now: Instant) -> bool {
        let blocking = failures.blocked_until.is_some_and(|until| until > now);
        !blocking && now.saturating_duration_since(failures.since) >= self.window
    }
}

/// The address failures are counted under: IPv4 as is (an IPv4-mapped IPv6
/// address too), IPv6 by its /64.
fn counted(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> FailedAuthThrottle {
        FailedAuthThrottle::new(3, Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn an_address_is_refused_after_its_limit_of_failures_until_the_window_passes() {
        let throttle = throttle();
        let (guesser, neighbour) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let start = Instant::now();
        for i in 0..3 {
            let at = start + Duration::from_secs(i);
            assert!(throttle.check_at(guesser, at).is_ok(), "failure {i}");
            throttle.record_failure_at(guesser, at);
        }
        let later = start + Duration::from_secs(4);
        let wait = throttle.check_at(guesser, later).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_secs(8),
            "a window from the last failure"
        );
        assert!(throttle.check_at(neighbour, later).is_ok());
        assert!(throttle
            .check_at(guesser, start + Duration::from_secs(12))
            .is_ok());
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_block() {
        let throttle = throttle();
        let address = "10.0.0.1".parse().unwrap();
        let start = Instant::now();
        for i in 0..10 {
            let at = start + Duration::from_secs(6 * i);
            throttle.record_failure_at(address, at);
            assert!(throttle.check_at(address, at).is_ok(), "failure {i}");
        }
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_zero_disables() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted(a), counted(b));
        assert_ne!(counted(a), counted(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(counted(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert!(FailedAuthThrottle::new(0, Duration::from_secs(10)).is_none());
        assert!(FailedAuthThrottle::new(5, Duration::ZERO).is_none());
    }
}
