//! Limits counted on each instance and reconciled with Redis every few milliseconds
//! (`[redis] sync = "50ms"`): no Redis call on a request's path while its keys
//! are fresh. The exact store ([`RedisBackend`]) costs two script calls a request (the
//! check, the settlement), which on a busy gateway is most of Redis's work; this store
//! trades exactness across instances for none, as Kong's `sync_rate` and Envoy's local
//! limits in front of a global service do.
//!
//! How it counts:
//! - Every check runs on an in-process [`MemoryBackend`] (the same GCRA steps, the same
//!   all-or-nothing), and each bucket's TAT moves are added up per bucket.
//! - Every `interval`, one `sync` script call sends those moves to Redis (each bucket
//!   moved on Redis's clock as the exact store would) with this instance's lease counts,
//!   and reads back every bucket it named, the leases the other instances hold and the
//!   penalties. Each local bucket is set to Redis's TAT, moved by what was charged here
//!   while the call was out.
//! - A check that names a key not read from Redis within
//!   [`STALE_INTERVALS`](redis_sync::STALE_INTERVALS) intervals
//!   (new to this instance, or idle here) reads it first, on the request's path: one
//!   round trip, as the exact store's. So an instance never starts a bucket from empty
//!   when Redis knows it.
//!
//! What that promises: an instance sees the others' charges at most `interval` (plus a
//! round trip) late, so across N instances a bucket can admit up to what the other
//! N - 1 instances admitted in the last interval beyond its limit; one instance alone
//! is exact. Concurrency leases count as "held here now + held elsewhere at the last
//! sync"; an instance that dies holding leases has them counted for
//! [`lease_ttl`] more. Abuse signals and lifting a penalty go to Redis at once; a new
//! penalty reaches the other instances within an interval. At shutdown, once every
//! request has settled, a last sync sends what is left and frees this instance's slots
//! ([`Backend::flush`]).
//!
//! When Redis does not answer, checks on fresh keys go on locally and their moves wait
//! for the next sync that works; a check that needs a read fails as
//! [`BackendError::Unavailable`], and the limiter falls back or refuses as for the
//! exact store.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::backend::{ActivePenalty, Backend, BackendError, Bucket, Check, Lease, Signal, Verdict};
use super::memory::MemoryBackend;
use super::redis::{RedisBackend, SyncCall, SyncReply};
use crate::redis_sync::{self, Reconcile};

/// How long an instance's published lease count stands without a newer sync: twenty
/// intervals, at least two seconds (a sync that fails now and then must not drop it).
pub fn lease_ttl(interval: Duration) -> Duration {
    (interval * 20).max(Duration::from_secs(2))
}

pub struct SyncedBackend {
    local: MemoryBackend,
    redis: RedisBackend,
    interval: Duration,
    /// Names this instance's lease counts in Redis.
    instance: String,
    state: Mutex<State>,
}

/// Maps keyed by bucket, lease and penalty keys: foldhash, not SipHash (the keys are
/// this gateway's own, and a check looks each of its keys up twice).
type Map<V> = foldhash::HashMap<String, V>;
type Set = foldhash::HashSet<String>;

#[derive(Default)]
struct State {
    /// Bucket key -> net TAT move (µs) made here since the last sync that took it.
    moved: Map<i64>,
    /// Bucket key -> moves a sync has sent and not yet had answered: Redis may or may
    /// not have them in a reply to another call (a key read on a request's path)
    /// meanwhile.
    sending: Map<i64>,
    /// Bucket key -> Redis's clock (µs) in the last reply taken for it: an older reply
    /// taken later must not undo a newer one.
    taken_at: Map<u64>,
    /// Lease and penalty keys checked since the last sync.
    leases: Set,
    penalties: Set,
    /// Lease key -> leases the other instances held at the last sync.
    others: Map<u64>,
    /// When each key was last read from Redis.
    fresh_buckets: Map<Instant>,
    fresh_leases: Map<Instant>,
    fresh_penalties: Map<Instant>,
}

impl State {
    /// The keys of `check` not read from Redis since `since`, to read (nothing moved).
    fn stale(&self, check: &Check, since: Instant, held: impl Fn(&str) -> u64) -> SyncCall {
        let mut call = SyncCall::default();
        for c in &check.charges {
            let key = &c.bucket.key;
            if !is_fresh(&self.fresh_buckets, key, since)
                && !call.buckets.iter().any(|(k, _)| k == key)
            {
                call.buckets.push((key.clone(), 0));
            }
        }
        for l in &check.leases {
            if !is_fresh(&self.fresh_leases, &l.key, since)
                && !call.leases.iter().any(|(k, _)| k == &l.key)
            {
                call.leases.push((l.key.clone(), held(&l.key)));
            }
        }
        if let Some(key) = &check.penalty_key
            && !is_fresh(&self.fresh_penalties, key, since)
        {
            call.penalties.push(key.clone());
        }
        call
    }

    /// Count a move of `key`'s TAT for the next sync (0: read it then).
    fn record(&mut self, key: &str, moved: i64) {
        match self.moved.get_mut(key) {
            Some(m) => *m = m.saturating_add(moved),
            None => {
                self.moved.insert(key.to_owned(), moved);
            }
        }
    }
}

/// `map[key] += by` for moves in flight; an entry that comes to 0 is removed.
fn add_in_flight(map: &mut Map<i64>, key: &str, by: i64) {
    if by == 0 {
        return;
    }
    let settled = match map.get_mut(key) {
        Some(m) => {
            *m = m.saturating_add(by);
            *m == 0
        }
        None => {
            map.insert(key.to_owned(), by);
            false
        }
    };
    if settled {
        map.remove(key);
    }
}

fn touch(set: &mut Set, key: &str) {
    if !set.contains(key) {
        set.insert(key.to_owned());
    }
}

fn is_fresh(map: &Map<Instant>, key: &str, since: Instant) -> bool {
    map.get(key).is_some_and(|t| *t >= since)
}

/// `tat` moved by `moved` µs at `now` as [`crate::limits::gcra::adjust`] moves it;
/// 0 when that leaves the bucket idle.
fn shift(tat: u64, now: u64, moved: i64) -> u64 {
    let out = if moved >= 0 {
        if tat <= now && moved == 0 {
            return 0;
        }
        tat.max(now).saturating_add(moved.unsigned_abs())
    } else {
        tat.saturating_sub(moved.unsigned_abs())
    };
    if out > now { out } else { 0 }
}

impl SyncedBackend {
    /// A store syncing with `redis` every `interval`, and the task that does it (it
    /// ends when the store is dropped).
    pub fn start(redis: RedisBackend, interval: Duration) -> Arc<SyncedBackend> {
        let store = Arc::new(SyncedBackend {
            local: MemoryBackend::new(),
            redis,
            interval,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            state: Mutex::new(State::default()),
        });
        redis_sync::spawn(&store, interval);
        store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts, not broken invariants.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take Redis's answer to `call` as this instance's state, keeping what was charged
    /// here and not yet in Redis. A sync's moves and a request's read of the same key
    /// can cross: Redis runs them in the order they were sent, but their replies may be
    /// taken in either order. So moves in flight count until their own reply is taken
    /// (a read that Redis ran first lacks them), a reply older than one already taken
    /// changes nothing, and moves counted twice meanwhile (in flight, and in a newer
    /// reply that had them) are taken off once.
    fn apply(&self, call: &SyncCall, reply: &SyncReply) {
        let at = Instant::now();
        let mut state = self.lock();
        let now = self.local.now_us();
        for ((key, sent), tat) in call.buckets.iter().zip(&reply.tats) {
            add_in_flight(&mut state.sending, key, -sent);
            state.fresh_buckets.insert(key.clone(), at);
            if state.taken_at.get(key).is_some_and(|t| reply.now_us < *t) {
                if *sent != 0 {
                    self.local.update_tat(key, |t, now| shift(t, now, -sent));
                }
                continue;
            }
            state.taken_at.insert(key.clone(), reply.now_us);
            // Redis's clock to this store's: the time left until the TAT carries over.
            let base = match tat.checked_sub(reply.now_us) {
                Some(ahead) if ahead > 0 => now.saturating_add(ahead),
                _ => 0,
            };
            let here = state.moved.get(key).copied().unwrap_or(0);
            let flying = state.sending.get(key).copied().unwrap_or(0);
            self.local
                .set_tat(key, shift(base, now, here.saturating_add(flying)));
        }
        for ((key, _), others) in call.leases.iter().zip(&reply.others) {
            state.others.insert(key.clone(), *others);
            state.fresh_leases.insert(key.clone(), at);
        }
        for (key, penalty) in call.penalties.iter().zip(&reply.penalties) {
            self.local.set_penalty(key, penalty.clone());
            state.fresh_penalties.insert(key.clone(), at);
        }
    }

    /// Send what was counted here since the last sync and take back everybody's state.
    /// On failure the moves are kept for the next one.
    pub async fn sync(&self) -> Result<(), BackendError> {
        let call = self.take_call();
        if call.is_empty() {
            return Ok(());
        }
        match self
            .redis
            .sync(&self.instance, lease_ttl(self.interval), &call)
            .await
        {
            Ok(reply) => {
                self.apply(&call, &reply);
                Ok(())
            }
            Err(e) => {
                self.put_back(call);
                Err(e)
            }
        }
    }

    /// What a sync sends: the moves counted here (in flight from now on), every lease
    /// key with this instance's count, the penalty keys checked.
    fn take_call(&self) -> SyncCall {
        let mut state = self.lock();
        let mut leases = std::mem::take(&mut state.leases);
        leases.extend(self.local.held_keys());
        let buckets: Vec<(String, i64)> = state.moved.drain().collect();
        for (key, net) in &buckets {
            add_in_flight(&mut state.sending, key, *net);
        }
        SyncCall {
            buckets,
            leases: leases
                .into_iter()
                .map(|k| {
                    let held = self.local.held(&k);
                    (k, held)
                })
                .collect(),
            penalties: state.penalties.drain().collect(),
        }
    }

    /// A sync that failed: its moves and keys wait for the next one.
    fn put_back(&self, call: SyncCall) {
        let mut state = self.lock();
        for (key, net) in &call.buckets {
            add_in_flight(&mut state.sending, key, -net);
            state.record(key, *net);
        }
        state.leases.extend(call.leases.into_iter().map(|(k, _)| k));
        state.penalties.extend(call.penalties);
    }
}

impl Reconcile for SyncedBackend {
    const WHAT: &'static str = "limit";

    async fn reconcile(&self) -> Result<(), String> {
        self.sync().await.map_err(|e| e.to_string())
    }

    /// Forget what nobody used for a while: idle buckets, expired leases and penalties,
    /// keys not read from Redis since `since`.
    fn sweep(&self, since: Instant) {
        self.local.sweep();
        let mut state = self.lock();
        let State {
            others,
            fresh_buckets,
            fresh_leases,
            fresh_penalties,
            taken_at,
            ..
        } = &mut *state;
        fresh_buckets.retain(|_, t| *t >= since);
        taken_at.retain(|k, _| fresh_buckets.contains_key(k));
        fresh_leases.retain(|_, t| *t >= since);
        fresh_penalties.retain(|_, t| *t >= since);
        others.retain(|k, _| fresh_leases.contains_key(k));
    }
}

#[async_trait]
impl Backend for SyncedBackend {
    fn name(&self) -> &'static str {
        "redis-synced"
    }

    async fn check(&self, check: &Check) -> Result<Verdict, BackendError> {
        let since = redis_sync::fresh_since(self.interval);
        let stale = self.lock().stale(check, since, |key| self.local.held(key));
        if !stale.is_empty() {
            let reply = self
                .redis
                .sync(&self.instance, lease_ttl(self.interval), &stale)
                .await?;
            self.apply(&stale, &reply);
        }
        let mut state = self.lock();
        let (verdict, applied) = self
            .local
            .check_with(check, &|key| state.others.get(key).copied().unwrap_or(0));
        // Refused or not, what was looked at is read again at the next sync.
        let mut applied = applied.into_iter().peekable();
        for (i, c) in check.charges.iter().enumerate() {
            let moved = match applied.next_if(|(j, _)| *j == i) {
                Some((_, inc)) => i64::try_from(inc).unwrap_or(i64::MAX),
                None => 0,
            };
            state.record(&c.bucket.key, moved);
        }
        for l in &check.leases {
            touch(&mut state.leases, &l.key);
        }
        if let Some(key) = &check.penalty_key {
            touch(&mut state.penalties, key);
        }
        Ok(verdict)
    }

    async fn adjust(&self, bucket: &Bucket, delta: i64) -> Result<(), BackendError> {
        let mut state = self.lock();
        let moved = self.local.adjust_now(bucket, delta);
        state.record(&bucket.key, moved);
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackendError> {
        self.local.release(lease).await?;
        touch(&mut self.lock().leases, &lease.key);
        Ok(())
    }

    async fn signal(&self, signal: &Signal) -> Result<bool, BackendError> {
        let started = self.redis.signal(signal).await?;
        if started {
            let penalty = Some((signal.penalty.clone(), signal.period));
            self.local.set_penalty(&signal.penalty_key, penalty);
        }
        Ok(started)
    }

    async fn penalties(&self) -> Result<Vec<ActivePenalty>, BackendError> {
        self.redis.penalties().await
    }

    async fn clear_penalty(&self, key: &str) -> Result<bool, BackendError> {
        let cleared = self.redis.clear_penalty(key).await?;
        self.local.set_penalty(key, None);
        Ok(cleared)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.redis.ping().await
    }

    /// The last sync: this instance's moves since the one before, and its lease counts
    /// (zero once every request has ended), so the others see its slots free at once.
    async fn flush(&self) -> Result<(), BackendError> {
        self.sync().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tat_from_redis_keeps_what_was_charged_here_meanwhile() {
        let now = 1_000;
        assert_eq!(shift(0, now, 0), 0, "idle stays idle");
        assert_eq!(shift(0, now, 50), 1_050, "an idle bucket charged here");
        assert_eq!(shift(1_200, now, 50), 1_250);
        assert_eq!(shift(1_200, now, -150), 1_050, "a refund");
        assert_eq!(shift(1_200, now, -500), 0, "refunded past now: idle");
        assert_eq!(shift(900, now, 0), 0, "a TAT already past is idle");
    }

    const SECOND: u64 = 1_000_000;

    /// A store that never reaches Redis in these tests (nothing listens on port 1, and
    /// its own sync is an hour away): each test hands it replies.
    fn store() -> Arc<SyncedBackend> {
        let config = crate::limits::config::RedisConfig {
            url: "redis://127.0.0.1:1".to_owned().into(),
            prefix: "t:".into(),
            on_failure: crate::limits::config::FailMode::Open,
            timeout: Duration::from_millis(10),
            sync: None,
        };
        let redis = RedisBackend::new(&config).unwrap_or_else(|e| panic!("{e}"));
        SyncedBackend::start(redis, Duration::from_secs(3600))
    }

    /// Ten seconds of TAT charged here on `k`, not yet synced.
    fn charged(store: &SyncedBackend) {
        let now = store.local.now_us();
        store.local.set_tat("k", now + 10 * SECOND);
        store.lock().record("k", (10 * SECOND) as i64);
    }

    /// How far `k`'s TAT is ahead of now, in whole seconds (rounded).
    fn ahead(store: &SyncedBackend) -> u64 {
        let tat = store.local.tat("k");
        (tat.saturating_sub(store.local.now_us()) + SECOND / 2) / SECOND
    }

    fn reply(now_us: u64, tat: u64) -> SyncReply {
        SyncReply {
            now_us,
            tats: vec![tat],
            others: vec![],
            penalties: vec![],
        }
    }

    fn read_k() -> SyncCall {
        SyncCall {
            buckets: vec![("k".into(), 0)],
            ..SyncCall::default()
        }
    }

    /// Redis's clock in these tests.
    const T: u64 = 5_000 * SECOND;

    #[tokio::test]
    async fn a_read_that_redis_ran_before_a_sync_keeps_the_moves_in_flight() {
        let s = store();
        charged(&s);
        let sync = s.take_call();
        assert_eq!(sync.buckets, [("k".to_owned(), (10 * SECOND) as i64)]);
        // Redis had nothing yet when it ran the read: the ten seconds are in flight.
        s.apply(&read_k(), &reply(T, 0));
        assert_eq!(ahead(&s), 10);
        // The sync's reply has them.
        s.apply(&sync, &reply(T + 1, T + 1 + 10 * SECOND));
        assert_eq!(ahead(&s), 10);
        assert!(s.lock().sending.is_empty());
    }

    #[tokio::test]
    async fn an_older_reply_taken_after_a_newer_one_changes_nothing() {
        let s = store();
        charged(&s);
        let sync = s.take_call();
        s.apply(&sync, &reply(T + 2, T + 2 + 10 * SECOND));
        // The read Redis ran first (it saw an idle bucket) is taken last.
        s.apply(&read_k(), &reply(T + 1, 0));
        assert_eq!(ahead(&s), 10);
    }

    #[tokio::test]
    async fn moves_in_flight_and_in_a_newer_reply_count_once() {
        let s = store();
        charged(&s);
        let sync = s.take_call();
        // Redis ran the sync, then the read; the read's reply is taken first and the
        // moves are still in flight here: counted twice for now.
        s.apply(&read_k(), &reply(T + 2, T + 2 + 10 * SECOND));
        assert_eq!(ahead(&s), 20);
        // The sync's own (older) reply takes the second count off.
        s.apply(&sync, &reply(T + 1, T + 1 + 10 * SECOND));
        assert_eq!(ahead(&s), 10);
        assert!(s.lock().sending.is_empty());
    }

    #[tokio::test]
    async fn a_failed_sync_puts_its_moves_back() {
        let s = store();
        charged(&s);
        let sync = s.take_call();
        s.put_back(sync);
        let state = s.lock();
        assert!(state.sending.is_empty());
        assert_eq!(state.moved.get("k"), Some(&((10 * SECOND) as i64)));
    }

    #[test]
    fn a_lease_count_stands_long_enough_to_survive_a_missed_sync() {
        assert_eq!(lease_ttl(Duration::from_millis(50)), Duration::from_secs(2));
        assert_eq!(lease_ttl(Duration::from_secs(1)), Duration::from_secs(20));
    }
}
