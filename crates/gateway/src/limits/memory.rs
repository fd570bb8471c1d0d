//! The in-process limit store: exact for one instance, and the fallback when Redis is
//! unreachable. Buckets live in a sharded map (no global lock); a check charges its
//! buckets one by one and rolls back the ones already charged when a later one refuses,
//! so it never admits more than the limits allow (a concurrent check may see a charge
//! that is about to be rolled back and refuse a little early, never late).

use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::time::Instant;

use super::backend::{
    ActivePenalty, Backend, BackendError, Bucket, BucketState, Check, Lease, Signal, Verdict,
};
use super::gcra;

/// foldhash, not SipHash: the keys are the gateway's own, and a check hashes several.
type Hasher = foldhash::fast::RandomState;

pub struct MemoryBackend {
    epoch: Instant,
    /// Bucket key -> TAT in microseconds since `epoch`.
    buckets: DashMap<String, u64, Hasher>,
    /// Lease key -> request ids holding a slot, with their expiry.
    leases: DashMap<String, Vec<(String, u64)>, Hasher>,
    /// Signal counter key -> (window start, count).
    counters: DashMap<String, (u64, u64)>,
    /// Penalty key -> (penalty, expiry).
    penalties: DashMap<String, (String, u64)>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            buckets: DashMap::with_hasher(Hasher::default()),
            leases: DashMap::with_hasher(Hasher::default()),
            counters: DashMap::new(),
            penalties: DashMap::new(),
        }
    }

    /// Microseconds since this store started, the clock its TATs are on; starts past
    /// zero so a fresh bucket (TAT 0) is always idle.
    pub(super) fn now_us(&self) -> u64 {
        us(self.epoch.elapsed()).saturating_add(1)
    }

    /// Drop what has expired: idle buckets, stale leases, old windows and penalties.
    pub fn sweep(&self) {
        let now = self.now_us();
        self.buckets.retain(|_, tat| *tat > now);
        self.leases.retain(|_, held| {
            held.retain(|(_, exp)| *exp > now);
            !held.is_empty()
        });
        self.penalties.retain(|_, (_, exp)| *exp > now);
        // A counter's window length is not stored; an hour-old window is surely over.
        self.counters
            .retain(|_, (start, _)| now.saturating_sub(*start) < 3_600_000_000);
    }

    fn penalty(&self, key: &str, now: u64) -> Option<(String, u64)> {
        let entry = self.penalties.get(key)?;
        let (penalty, exp) = entry.value();
        (*exp > now).then(|| (penalty.clone(), exp - now))
    }

    fn check_now(&self, check: &Check) -> Verdict {
        self.check_with(check, &|_| 0).0
    }

    /// A check where `others(lease key)` leases are held elsewhere (other instances,
    /// for [`SyncedBackend`](super::synced::SyncedBackend)). When allowed, also returns
    /// how far each charge moved its bucket's TAT (µs), by index into `charges`.
    pub(super) fn check_with(
        &self,
        check: &Check,
        others: &dyn Fn(&str) -> u64,
    ) -> (Verdict, Vec<(usize, u64)>) {
        let now = self.now_us();
        if let Some(key) = &check.penalty_key
            && let Some((penalty, left)) = self.penalty(key, now)
        {
            let verdict = Verdict::Penalized {
                penalty,
                remaining: Duration::from_micros(left),
            };
            return (verdict, Vec::new());
        }
        let mut states = Vec::with_capacity(check.charges.len());
        let mut applied: Vec<(usize, u64)> = Vec::with_capacity(check.charges.len());
        let mut refused: Option<(usize, u64)> = None;
        for (i, c) in check.charges.iter().enumerate() {
            let period = us(c.bucket.period);
            let mut tat = made(&self.buckets, &c.bucket.key);
            let step = gcra::charge(*tat, now, c.cost, c.bucket.limit, period);
            states.push(BucketState {
                limit: c.bucket.limit,
                remaining: step.remaining,
                reset: Duration::from_micros(step.reset_us),
            });
            if step.allowed {
                applied.push((i, step.new_tat - (*tat).max(now)));
                *tat = step.new_tat;
            } else if refused.is_none() {
                refused = Some((i, step.retry_after_us));
            }
        }
        if refused.is_none() {
            for (j, lease) in check.leases.iter().enumerate() {
                let mut held = made(&self.leases, &lease.key);
                held.retain(|(_, exp)| *exp > now);
                if held.len() as u64 + others(&lease.key) >= lease.max {
                    refused = Some((check.charges.len() + j, 1_000_000));
                    // Give back the leases taken before this one.
                    for earlier in &check.leases[..j] {
                        self.drop_lease(earlier);
                    }
                    break;
                }
                held.push((lease.id.clone(), now.saturating_add(us(lease.ttl))));
            }
        }
        match refused {
            None => (Verdict::Allowed { states }, applied),
            Some((index, retry_us)) => {
                for (i, inc) in applied {
                    if let Some(mut tat) = self.buckets.get_mut(&check.charges[i].bucket.key) {
                        *tat = tat.saturating_sub(inc);
                    }
                }
                let verdict = Verdict::Refused {
                    index,
                    retry_after: Duration::from_micros(retry_us),
                    states,
                };
                (verdict, Vec::new())
            }
        }
    }

    /// Move a bucket's TAT for `delta` units after the fact; how far it moved (µs).
    pub(super) fn adjust_now(&self, bucket: &Bucket, delta: i64) -> i64 {
        let now = self.now_us();
        let mut tat = made(&self.buckets, &bucket.key);
        let before = (*tat).max(now);
        *tat = gcra::adjust(*tat, now, delta, bucket.limit, us(bucket.period));
        let moved = i128::from(*tat) - i128::from(before);
        i64::try_from(moved).unwrap_or(if moved < 0 { i64::MIN } else { i64::MAX })
    }

    /// Set a bucket's TAT (on [`Self::now_us`]'s clock); 0 forgets it.
    pub(super) fn set_tat(&self, key: &str, tat: u64) {
        if tat == 0 {
            self.buckets.remove(key);
        } else {
            self.buckets.insert(key.to_owned(), tat);
        }
    }

    /// A bucket's TAT (0: none) at [`Self::now_us`] into `f`; what it returns is the
    /// bucket's new TAT (0 forgets it).
    pub(super) fn update_tat(&self, key: &str, f: impl FnOnce(u64, u64) -> u64) {
        let now = self.now_us();
        let tat = self.buckets.get(key).map_or(0, |t| *t);
        self.set_tat(key, f(tat, now));
    }

    /// A bucket's TAT (0: none).
    #[cfg(test)]
    pub(super) fn tat(&self, key: &str) -> u64 {
        self.buckets.get(key).map_or(0, |t| *t)
    }

    /// Leases held on `key` now.
    pub(super) fn held(&self, key: &str) -> u64 {
        let now = self.now_us();
        self.leases.get_mut(key).map_or(0, |mut held| {
            held.retain(|(_, exp)| *exp > now);
            held.len() as u64
        })
    }

    /// Lease keys with a lease held.
    pub(super) fn held_keys(&self) -> Vec<String> {
        self.leases
            .iter()
            .filter(|e| !e.value().is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// Hold `penalty` on `key` for `remaining`, or lift it (`None`).
    pub(super) fn set_penalty(&self, key: &str, penalty: Option<(String, Duration)>) {
        match penalty {
            Some((value, remaining)) => {
                let until = self.now_us().saturating_add(us(remaining));
                self.penalties.insert(key.to_owned(), (value, until));
            }
            None => {
                self.penalties.remove(key);
            }
        }
    }

    fn drop_lease(&self, lease: &Lease) {
        if let Some(mut held) = self.leases.get_mut(&lease.key) {
            held.retain(|(id, _)| id != &lease.id);
        }
    }
}

/// `map`'s entry for `key` to read and change, made (`Default`: a TAT of 0, no leases)
/// when new. The key is copied only for a new entry: most checks find their buckets
/// and lease sets, and `entry` takes an owned key.
fn made<'a, V: Default>(
    map: &'a DashMap<String, V, Hasher>,
    key: &str,
) -> dashmap::mapref::one::RefMut<'a, String, V> {
    match map.get_mut(key) {
        Some(v) => v,
        None => map.entry(key.to_owned()).or_default(),
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn check(&self, check: &Check) -> Result<Verdict, BackendError> {
        Ok(self.check_now(check))
    }

    async fn adjust(&self, bucket: &Bucket, delta: i64) -> Result<(), BackendError> {
        self.adjust_now(bucket, delta);
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.drop_lease(lease);
        Ok(())
    }

    async fn signal(&self, signal: &Signal) -> Result<bool, BackendError> {
        let now = self.now_us();
        let window = us(signal.window);
        let count = {
            let mut c = self
                .counters
                .entry(signal.counter_key.clone())
                .or_insert((now, 0));
            if now.saturating_sub(c.0) >= window {
                *c = (now, 0);
            }
            c.1 += 1;
            c.1
        };
        if count < signal.threshold || self.penalty(&signal.penalty_key, now).is_some() {
            return Ok(false);
        }
        self.penalties.insert(
            signal.penalty_key.clone(),
            (
                signal.penalty.clone(),
                now.saturating_add(us(signal.period)),
            ),
        );
        // The next window starts counting afresh once the penalty is over.
        self.counters.remove(&signal.counter_key);
        Ok(true)
    }

    async fn penalties(&self) -> Result<Vec<ActivePenalty>, BackendError> {
        let now = self.now_us();
        Ok(self
            .penalties
            .iter()
            .filter(|e| e.value().1 > now)
            .map(|e| ActivePenalty {
                key: e.key().clone(),
                penalty: e.value().0.clone(),
                remaining: Duration::from_micros(e.value().1 - now),
            })
            .collect())
    }

    async fn clear_penalty(&self, key: &str) -> Result<bool, BackendError> {
        Ok(self.penalties.remove(key).is_some())
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::limits::backend::{Charge, Unit};

    pub fn rate(key: &str, limit: u64, period: Duration, cost: u64, unit: Unit) -> Charge {
        Charge {
            bucket: Bucket {
                key: key.into(),
                limit,
                period,
            },
            cost,
            unit,
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_buckets() {
        let m = MemoryBackend::new();
        let check = |cost| Check {
            penalty_key: None,
            charges: vec![
                rate("a", 10, MIN, 1, Unit::Requests),
                rate("b", 100, MIN, cost, Unit::Tokens),
            ],
            leases: vec![],
        };
        assert!(matches!(
            m.check(&check(60)).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        // 60 + 60 > 100: refused by b, and a is not charged either.
        let v = m.check(&check(60)).await.unwrap();
        let Verdict::Refused { index, states, .. } = v else {
            panic!("expected a refusal, got {v:?}")
        };
        assert_eq!(index, 1);
        assert_eq!(
            states[0].remaining, 8,
            "a's state as it would be after charging"
        );
        let only_a = Check {
            penalty_key: None,
            charges: vec![rate("a", 10, MIN, 9, Unit::Requests)],
            leases: vec![],
        };
        assert!(
            matches!(m.check(&only_a).await.unwrap(), Verdict::Allowed { .. }),
            "a still has 9 left: the refused check was rolled back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_cap_concurrency_and_free_on_release() {
        let m = MemoryBackend::new();
        let lease = |id: &str| Lease {
            key: "c".into(),
            max: 2,
            id: id.into(),
            ttl: Duration::from_secs(30),
        };
        let check = |id: &str| Check {
            penalty_key: None,
            charges: vec![],
            leases: vec![lease(id)],
        };
        assert!(matches!(
            m.check(&check("1")).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            m.check(&check("2")).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            m.check(&check("3")).await.unwrap(),
            Verdict::Refused { index: 0, .. }
        ));
        m.release(&lease("1")).await.unwrap();
        assert!(matches!(
            m.check(&check("3")).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        // A lease nobody released expires with its ttl.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(
            m.check(&check("4")).await.unwrap(),
            Verdict::Allowed { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn signals_start_a_penalty_that_ends() {
        let m = MemoryBackend::new();
        let signal = Signal {
            counter_key: "a:o:u:injection".into(),
            window: Duration::from_secs(60),
            threshold: 3,
            penalty_key: "p:o:u".into(),
            penalty: "block".into(),
            period: Duration::from_secs(10),
        };
        assert!(!m.signal(&signal).await.unwrap());
        assert!(!m.signal(&signal).await.unwrap());
        assert!(
            m.signal(&signal).await.unwrap(),
            "the third signal starts it"
        );
        let check = Check {
            penalty_key: Some("p:o:u".into()),
            charges: vec![rate("x", 1, MIN, 1, Unit::Requests)],
            leases: vec![],
        };
        assert!(matches!(
            m.check(&check).await.unwrap(),
            Verdict::Penalized { ref penalty, .. } if penalty == "block"
        ));
        assert_eq!(m.penalties().await.unwrap().len(), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            m.check(&check).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        assert!(m.penalties().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn adjust_reconciles_tokens() {
        let m = MemoryBackend::new();
        let c = rate("t", 1000, MIN, 800, Unit::Tokens);
        let check = Check {
            penalty_key: None,
            charges: vec![c.clone()],
            leases: vec![],
        };
        assert!(matches!(
            m.check(&check).await.unwrap(),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            m.check(&check).await.unwrap(),
            Verdict::Refused { .. }
        ));
        // The request used 100, not 800: refund 700 and another 800 fits.
        m.adjust(&c.bucket, -700).await.unwrap();
        assert!(matches!(
            m.check(&check).await.unwrap(),
            Verdict::Allowed { .. }
        ));
    }
}
