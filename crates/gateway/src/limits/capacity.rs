//! Provider capacity: how fast one configured model may be called upstream, and who
//! waits when it runs short.
//!
//! One [`Capacity`] per configured model, in process: each gateway instance keeps its
//! own, so N instances together may send up to N times the configured rate (configure
//! each instance's share). Models on one provider share nothing.
//!
//! - **Buckets.** Requests and tokens per minute, each a continuously refilled token
//!   bucket kept in its virtual-scheduling form (one `Instant` per bucket: when it is
//!   full again), so refill times come out exact. The burst is ten seconds' worth of
//!   the rate (at least one unit), not a minute's: a provider that sees a whole
//!   minute's allowance in one instant answers with 429s of its own.
//! - **Queue.** When the buckets are short, a request waits in a bounded queue ordered
//!   by priority (higher first, FIFO within one), until its deadline at most. A full
//!   queue sheds the newcomer, or displaces the lowest-priority, newest waiter when the
//!   newcomer outranks it. Only the head of the queue holds a refill timer
//!   (`sleep_until` the exact refill time); everyone else sleeps until their deadline
//!   or until woken as the new head. A dropped waiter (client gone) leaves the queue.
//! - **AIMD.** An upstream 429 halves the allowed rate (to 1/16 at least) and pauses
//!   admission for its `retry-after`; each success adds back 1/20. With no rate
//!   configured or announced, a 429 starts a learned rate from the successes seen in
//!   the last minute.
//! - **Upstream headers.** `x-ratelimit-*` (OpenAI) and `anthropic-ratelimit-*`
//!   ([`UpstreamLimits`]): an announced limit below the configured one wins, and no
//!   more requests or tokens go out than the upstream says remain before its reset.
//!
//! Hand-written rather than `governor`: governor has no priority queue, no way to
//! change the rate of a live limiter (AIMD), and no way to follow an upstream's
//! remaining/reset counts.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, Sleep, sleep_until};

/// Requests that may wait for one model's capacity at once (until the lead wires config).
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// Longest a request waits for capacity, whatever its own deadline.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

/// The burst: this much time's worth of the rate may go at once.
const BURST_WINDOW: Duration = Duration::from_secs(10);
const MINUTE: Duration = Duration::from_secs(60);
/// AIMD: a 429 multiplies the rate factor by this...
const DECREASE: f64 = 0.5;
/// ...down to this at most...
const MIN_FACTOR: f64 = 1.0 / 16.0;
/// ...and each success adds this back, up to 1.
const INCREASE: f64 = 1.0 / 20.0;
/// 429s arriving together (the answers to one burst) count as one decrease, as TCP
/// halves its window once per round trip rather than once per lost packet.
const DECREASE_HOLDOFF: Duration = Duration::from_secs(1);
/// A learned rate is dropped after this long without a 429 (at full factor), so the
/// gateway finds out when the upstream allows more again.
const LEARNED_TTL: Duration = Duration::from_secs(60);
/// Successes in the last minute needed before a 429 teaches a rate.
const MIN_LEARNING_SAMPLE: f64 = 10.0;
/// Clients are never told to come back sooner than this.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Rates and queue sizing of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityConfig {
    /// `None`: no configured request rate (headers and 429s may still set one).
    pub requests_per_minute: Option<u32>,
    /// `None`: no configured token rate.
    pub tokens_per_minute: Option<u32>,
    /// Requests that may wait at once; 0 sheds whatever does not fit right away.
    pub max_queue: usize,
    /// Longest any request waits.
    pub max_wait: Duration,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            max_queue: DEFAULT_MAX_QUEUE,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

/// A request refused for want of capacity (rendered as 429 with `retry-after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("provider capacity exhausted ({}); retry after {} ms", reason.as_str(), retry_after.as_millis())]
pub struct Shed {
    /// When capacity is expected to have freed up for this request; at least 1 s.
    pub retry_after: Duration,
    pub reason: ShedReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The queue was full of requests of equal or higher priority.
    QueueFull,
    /// The request's deadline (or the longest wait) passed before capacity freed up.
    Deadline,
    /// A higher-priority request took this one's place in a full queue.
    Displaced,
}

impl ShedReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::Deadline => "deadline",
            ShedReason::Displaced => "displaced",
        }
    }
}

/// The capacity of one configured model. See the module doc.
pub struct Capacity {
    max_queue: usize,
    max_wait: Duration,
    state: Mutex<State>,
}

impl Capacity {
    pub fn new(config: CapacityConfig) -> Self {
        let now = Instant::now();
        let configured = |rate: Option<u32>| rate.filter(|r| *r > 0).map(f64::from);
        let mut state = State {
            requests: Dimension::new(configured(config.requests_per_minute)),
            tokens: Dimension::new(configured(config.tokens_per_minute)),
            factor: 1.0,
            last_decrease: None,
            paused_until: None,
            successes: Window::new(now),
            queue: BTreeMap::new(),
            next_seq: 0,
        };
        state.apply_rates(now);
        Self {
            max_queue: config.max_queue,
            max_wait: config.max_wait,
            state: Mutex::new(state),
        }
    }

    /// Wait for room for one request of about `tokens` tokens (prompt plus expected
    /// output). Returns at once when there is room and nobody of equal or higher
    /// priority waits; otherwise queues until admitted, shed, or `deadline` (capped at
    /// the longest wait) passes. Dropping the future leaves the queue.
    pub async fn admit(&self, priority: u32, tokens: u32, deadline: Instant) -> Result<(), Shed> {
        let now = Instant::now();
        let deadline = deadline.min(later(now, self.max_wait));
        let key = {
            let mut st = self.lock();
            if st.first_in_line(priority) && st.try_take(tokens, now).is_ok() {
                return Ok(());
            }
            if deadline <= now {
                let (requests, queued_tokens) = st.ahead_of_priority(priority);
                return Err(st.shed(
                    ShedReason::Deadline,
                    requests + 1,
                    queued_tokens + u64::from(tokens),
                    now,
                ));
            }
            st.enqueue(priority, tokens, self.max_queue, now)?
        };
        let mut place = Place {
            capacity: self,
            key,
            tokens,
            deadline,
            settled: false,
        };
        let mut timer = pin!(sleep_until(deadline));
        poll_fn(|cx| place.poll(cx, timer.as_mut())).await
    }

    /// The upstream answered 429: halve the allowed rate (once per burst of 429s) and,
    /// when it said how long, admit nothing until then.
    pub fn on_rate_limited(&self, retry_after: Option<Duration>) {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(after) = retry_after {
            let until = later(now, after);
            st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
        }
        let holding = st
            .last_decrease
            .is_some_and(|at| now < later(at, DECREASE_HOLDOFF));
        if !holding {
            st.last_decrease = Some(now);
            if st.requests.base().is_none() && st.tokens.base().is_none() {
                // Nothing configured or announced: what got through lately is the
                // best guess of what the upstream allows. With too little traffic to
                // tell (a 429 at start-up), guessing would throttle everyone to a
                // trickle for a minute; the retry-after pause alone applies then.
                let seen = st.successes.per_minute(now);
                if seen >= MIN_LEARNING_SAMPLE {
                    st.requests.learned = Some(seen);
                }
            }
            st.factor = (st.factor * DECREASE).max(MIN_FACTOR);
            st.apply_rates(now);
        }
        // Once the pause is over one request may go, the rest at the reduced rate:
        // no burst into an upstream that just said no.
        let resume = st.paused_until.map_or(now, |p| p.max(now));
        st.requests.drain(resume);
        st.tokens.drain(resume);
    }

    /// The upstream answered successfully: grow the rate back by 1/20.
    pub fn on_success(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        st.successes.record(now);
        let before = st.factor;
        st.factor = (st.factor + INCREASE).min(1.0);
        let mut changed = st.factor != before;
        if st.factor >= 1.0
            && st.requests.learned.is_some()
            && st
                .last_decrease
                .is_none_or(|at| now >= later(at, LEARNED_TTL))
        {
            st.requests.learned = None;
            changed = true;
        }
        if changed {
            st.apply_rates(now);
            st.wake_head();
        }
    }

    /// Follow what the upstream announced: its limits (the smaller of configured and
    /// announced applies) and what remains of them before their reset.
    pub fn observe(&self, limits: &UpstreamLimits) {
        let now = Instant::now();
        let mut st = self.lock();
        st.requests.observe(
            limits.limit_requests,
            limits.remaining_requests,
            limits.reset_requests,
            now,
        );
        st.tokens.observe(
            limits.limit_tokens,
            limits.remaining_tokens,
            limits.reset_tokens,
            now,
        );
        st.apply_rates(now);
        st.wake_head();
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the numbers are
        // still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Queue order: higher priority first, then arrival.
type Key = (Reverse<u32>, u64);

struct Waiter {
    tokens: u32,
    waker: Option<Waker>,
}

struct State {
    requests: Dimension,
    tokens: Dimension,
    /// AIMD multiplier of every rate, `MIN_FACTOR..=1`.
    factor: f64,
    last_decrease: Option<Instant>,
    /// After a 429 with `retry-after`, nothing goes before this.
    paused_until: Option<Instant>,
    successes: Window,
    queue: BTreeMap<Key, Waiter>,
    next_seq: u64,
}

impl State {
    /// Nobody of equal or higher priority is waiting.
    fn first_in_line(&self, priority: u32) -> bool {
        self.queue
            .first_key_value()
            .is_none_or(|((Reverse(p), _), _)| *p < priority)
    }

    /// Charge one request of `tokens` now, or say when it would fit.
    fn try_take(&mut self, tokens: u32, now: Instant) -> Result<(), Instant> {
        let mut at = now;
        if let Some(p) = self.paused_until {
            if p > now {
                at = p;
            } else {
                self.paused_until = None;
            }
        }
        let tokens = u64::from(tokens);
        at = at
            .max(self.requests.ready_at(1, now))
            .max(self.tokens.ready_at(tokens, now));
        if at > now {
            return Err(at);
        }
        self.requests.charge(1, now);
        self.tokens.charge(tokens, now);
        Ok(())
    }

    fn enqueue(
        &mut self,
        priority: u32,
        tokens: u32,
        max_queue: usize,
        now: Instant,
    ) -> Result<Key, Shed> {
        if self.queue.len() >= max_queue {
            let outranks = self
                .queue
                .last_key_value()
                .is_some_and(|((Reverse(p), _), _)| *p < priority);
            if !outranks {
                let (requests, queued_tokens) = totals(self.queue.values());
                return Err(self.shed(
                    ShedReason::QueueFull,
                    requests + 1,
                    queued_tokens + u64::from(tokens),
                    now,
                ));
            }
            // The victim finds its place gone when it wakes, and reports `Displaced`.
            if let Some((_, victim)) = self.queue.pop_last()
                && let Some(waker) = victim.waker
            {
                waker.wake();
            }
        }
        let key = (Reverse(priority), self.next_seq);
        self.next_seq += 1;
        self.queue.insert(
            key,
            Waiter {
                tokens,
                waker: None,
            },
        );
        Ok(key)
    }

    /// Remove a waiter; when it was the head, the new head takes over the refill timer.
    fn leave(&mut self, key: &Key) {
        let was_head = self.queue.first_key_value().is_some_and(|(k, _)| k == key);
        if self.queue.remove(key).is_some() && was_head {
            self.wake_head();
        }
    }

    /// Capacity may have freed up: the head re-checks and re-arms its timer.
    fn wake_head(&self) {
        if let Some((_, waiter)) = self.queue.first_key_value()
            && let Some(waker) = &waiter.waker
        {
            waker.wake_by_ref();
        }
    }

    /// Requests and tokens queued ahead of a newcomer of `priority`.
    fn ahead_of_priority(&self, priority: u32) -> (u64, u64) {
        totals(
            self.queue
                .range(..=(Reverse(priority), u64::MAX))
                .map(|(_, w)| w),
        )
    }

    fn shed(&self, reason: ShedReason, requests: u64, tokens: u64, now: Instant) -> Shed {
        Shed {
            retry_after: self.estimate(requests, tokens, now),
            reason,
        }
    }

    /// Time until `requests` requests totalling `tokens` tokens could all have gone:
    /// what a shed request is told to wait. At least [`MIN_RETRY_AFTER`].
    fn estimate(&self, requests: u64, tokens: u64, now: Instant) -> Duration {
        let at = self
            .requests
            .drain_at(requests, now)
            .max(self.tokens.drain_at(tokens, now))
            .max(self.paused_until.unwrap_or(now));
        at.saturating_duration_since(now).max(MIN_RETRY_AFTER)
    }

    fn apply_rates(&mut self, now: Instant) {
        self.requests.apply(self.factor, now);
        self.tokens.apply(self.factor, now);
    }
}

fn totals<'a>(waiters: impl Iterator<Item = &'a Waiter>) -> (u64, u64) {
    waiters.fold((0, 0), |(n, t), w| (n + 1, t + u64::from(w.tokens)))
}

/// A queued request; leaves the queue when dropped before it was settled.
struct Place<'a> {
    capacity: &'a Capacity,
    key: Key,
    tokens: u32,
    deadline: Instant,
    settled: bool,
}

impl Place<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<Result<(), Shed>> {
        loop {
            let now = Instant::now();
            let wake_at = {
                let mut st = self.capacity.lock();
                let tokens = u64::from(self.tokens);
                if !st.queue.contains_key(&self.key) {
                    // Only a newcomer of higher priority removes someone else's place.
                    self.settled = true;
                    let (requests, queued_tokens) = totals(st.queue.values());
                    let shed = st.shed(
                        ShedReason::Displaced,
                        requests + 1,
                        queued_tokens + tokens,
                        now,
                    );
                    return Poll::Ready(Err(shed));
                }
                let is_head = st
                    .queue
                    .first_key_value()
                    .is_some_and(|(k, _)| *k == self.key);
                let ready = if is_head {
                    match st.try_take(self.tokens, now) {
                        Ok(()) => {
                            st.leave(&self.key);
                            self.settled = true;
                            return Poll::Ready(Ok(()));
                        }
                        Err(at) => Some(at),
                    }
                } else {
                    None
                };
                if now >= self.deadline {
                    let (requests, queued_tokens) =
                        totals(st.queue.range(..self.key).map(|(_, w)| w));
                    let shed = st.shed(
                        ShedReason::Deadline,
                        requests + 1,
                        queued_tokens + tokens,
                        now,
                    );
                    st.leave(&self.key);
                    self.settled = true;
                    return Poll::Ready(Err(shed));
                }
                if let Some(waiter) = st.queue.get_mut(&self.key)
                    && !waiter
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    waiter.waker = Some(cx.waker().clone());
                }
                ready.map_or(self.deadline, |at| at.min(self.deadline))
            };
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.capacity.lock().leave(&self.key);
        }
    }
}

/// Requests or tokens: where the rate comes from, the bucket, the upstream's count.
struct Dimension {
    configured: Option<f64>,
    /// The upstream's announced `limit-*` (per minute).
    announced: Option<f64>,
    /// Set by a 429 when nothing is configured or announced (requests only).
    learned: Option<f64>,
    bucket: Option<Bucket>,
    gate: Option<Gate>,
}

impl Dimension {
    fn new(configured: Option<f64>) -> Self {
        Self {
            configured,
            announced: None,
            learned: None,
            bucket: None,
            gate: None,
        }
    }

    /// Per-minute rate before AIMD: the smaller of configured and announced, else the
    /// learned one; `None` is unlimited.
    fn base(&self) -> Option<f64> {
        match (self.configured, self.announced) {
            (Some(c), Some(a)) => Some(c.min(a)),
            (c, a) => c.or(a).or(self.learned),
        }
    }

    fn apply(&mut self, factor: f64, now: Instant) {
        match (self.base(), &mut self.bucket) {
            (None, _) => self.bucket = None,
            (Some(base), Some(bucket)) => bucket.set_rate(base * factor, now),
            (Some(base), None) => self.bucket = Some(Bucket::new(base * factor, now)),
        }
    }

    fn observe(
        &mut self,
        limit: Option<u64>,
        remaining: Option<u64>,
        reset: Option<Duration>,
        now: Instant,
    ) {
        if let Some(limit) = limit.filter(|l| *l > 0) {
            self.announced = Some(limit as f64);
        }
        // A remaining count without a reset would hold forever: only both together.
        if let (Some(remaining), Some(reset)) = (remaining, reset) {
            self.gate = Some(Gate {
                remaining,
                until: later(now, reset),
            });
        }
    }

    fn ready_at(&self, units: u64, now: Instant) -> Instant {
        let bucket = self.bucket.map_or(now, |b| b.ready_at(units, now));
        let gate = self.gate.map_or(now, |g| g.ready_at(units, now));
        bucket.max(gate)
    }

    fn drain_at(&self, units: u64, now: Instant) -> Instant {
        let bucket = self.bucket.map_or(now, |b| b.drain_at(units, now));
        let gate = self.gate.map_or(now, |g| g.ready_at(units, now));
        bucket.max(gate)
    }

    fn charge(&mut self, units: u64, now: Instant) {
        if let Some(bucket) = &mut self.bucket {
            bucket.charge(units, now);
        }
        if let Some(gate) = &mut self.gate {
            if now >= gate.until {
                self.gate = None;
            } else {
                gate.remaining = gate.remaining.saturating_sub(units);
            }
        }
    }

    fn drain(&mut self, resume: Instant) {
        if let Some(bucket) = &mut self.bucket {
            bucket.drain(resume);
        }
    }
}

/// A token bucket in virtual-scheduling (GCRA) form: instead of a level refilled on
/// every check, the moment the bucket will be full again. Taking `n` units moves it
/// `n * interval` later; they fit when it stays within `tolerance` (the burst) of now.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Refill time of one unit at the current rate.
    interval: Duration,
    /// The burst as time: `BURST_WINDOW`, or one unit when that is longer.
    tolerance: Duration,
    /// When the bucket is full again; at or before now it is full.
    full_at: Instant,
}

impl Bucket {
    fn new(per_minute: f64, now: Instant) -> Self {
        let interval = unit_interval(per_minute);
        Self {
            interval,
            tolerance: BURST_WINDOW.max(interval),
            full_at: now,
        }
    }

    fn cost(&self, units: u64) -> Duration {
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        self.interval.saturating_mul(units)
    }

    /// When `units` can be taken. More than a whole burst goes once the bucket is full
    /// (leaving a debt later requests wait out); otherwise once the units have refilled.
    fn ready_at(&self, units: u64, now: Instant) -> Instant {
        let cost = self.cost(units);
        let at = if cost >= self.tolerance {
            self.full_at
        } else {
            self.full_at
                .checked_sub(self.tolerance - cost)
                .unwrap_or(now)
        };
        at.max(now)
    }

    /// When `units` taken one after another would all have gone.
    fn drain_at(&self, units: u64, now: Instant) -> Instant {
        let end = later(self.full_at.max(now), self.cost(units));
        end.checked_sub(self.tolerance).unwrap_or(now).max(now)
    }

    fn charge(&mut self, units: u64, now: Instant) {
        self.full_at = later(self.full_at.max(now), self.cost(units));
    }

    /// Change the rate, keeping the units that would fit now (at most the new burst):
    /// an empty bucket stays empty, a debt stays owed, and only refill speeds change.
    fn set_rate(&mut self, per_minute: f64, now: Instant) {
        let interval = unit_interval(per_minute);
        if interval == self.interval {
            return;
        }
        let used = self.full_at.saturating_duration_since(now).as_secs_f64();
        // Negative when more than the burst is owed.
        let free = (self.tolerance.as_secs_f64() - used) / self.interval.as_secs_f64();
        let tolerance = BURST_WINDOW.max(interval);
        let free = free.min(tolerance.as_secs_f64() / interval.as_secs_f64());
        let used = tolerance.as_secs_f64() - free * interval.as_secs_f64();
        self.interval = interval;
        self.tolerance = tolerance;
        self.full_at = later(
            now,
            Duration::try_from_secs_f64(used).unwrap_or(Duration::ZERO),
        );
    }

    /// Empty the bucket so that one unit fits at `resume`.
    fn drain(&mut self, resume: Instant) {
        let empty = later(resume, self.tolerance.saturating_sub(self.interval));
        self.full_at = self.full_at.max(empty);
    }
}

fn unit_interval(per_minute: f64) -> Duration {
    // AIMD keeps rates at 1/16 of at least 1 per minute; the floor only guards the math.
    let per_minute = if per_minute.is_finite() {
        per_minute.max(1.0 / 16.0)
    } else {
        1.0 / 16.0
    };
    Duration::try_from_secs_f64(60.0 / per_minute).unwrap_or(MINUTE)
}

/// What the upstream says remains until `until`: nothing beyond it goes before then.
#[derive(Debug, Clone, Copy)]
struct Gate {
    remaining: u64,
    until: Instant,
}

impl Gate {
    fn ready_at(&self, units: u64, now: Instant) -> Instant {
        if now >= self.until || self.remaining >= units {
            now
        } else {
            self.until
        }
    }
}

/// Successes per minute, as a sliding window over two fixed one-minute windows.
struct Window {
    start: Instant,
    current: u64,
    previous: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= 2 * MINUTE {
            self.previous = 0;
            self.current = 0;
            self.start = now;
        } else if elapsed >= MINUTE {
            self.previous = self.current;
            self.current = 0;
            self.start = later(self.start, MINUTE);
        }
    }

    fn record(&mut self, now: Instant) {
        self.roll(now);
        self.current += 1;
    }

    fn per_minute(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let into = now.saturating_duration_since(self.start).as_secs_f64() / 60.0;
        self.previous as f64 * (1.0 - into).max(0.0) + self.current as f64
    }
}

fn later(at: Instant, after: Duration) -> Instant {
    // Overflows only past the end of time; "never" is as good there.
    at.checked_add(after).unwrap_or(at)
}

// ---- upstream headers ------------------------------------------------------------------

/// What an upstream's rate-limit headers said. Counts are per minute for limits;
/// resets are the time until the limit is fully replenished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamLimits {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_tokens: Option<Duration>,
}

impl UpstreamLimits {
    /// Read OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as
    /// Go durations: `20ms`, `1s`, `6m0s`) or Anthropic's
    /// `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}` (resets as RFC
    /// 3339 times; `input-tokens-*` stand in when plain `tokens-*` are absent).
    /// `None` when the answer carried none of them.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<UpstreamLimits> {
        Self::from_headers_at(headers, SystemTime::now())
    }

    fn from_headers_at(headers: &http::HeaderMap, now: SystemTime) -> Option<UpstreamLimits> {
        use http::HeaderName as N;
        // An upstream that sends none of these (self-hosted servers often don't): one
        // pass over an answer's few header names instead of fifteen lookups that miss.
        if !headers.keys().any(|n| {
            let n = n.as_str();
            n.starts_with("x-ratelimit-") || n.starts_with("anthropic-ratelimit-")
        }) {
            return None;
        }
        // Names built once: looking a header up by `&str` parses the name every time,
        // and this runs on every upstream answer.
        const ANTHROPIC_REQUESTS: [N; 3] = [
            N::from_static("anthropic-ratelimit-requests-limit"),
            N::from_static("anthropic-ratelimit-requests-remaining"),
            N::from_static("anthropic-ratelimit-requests-reset"),
        ];
        static ANTHROPIC_TOKENS: [N; 3] = [
            N::from_static("anthropic-ratelimit-tokens-limit"),
            N::from_static("anthropic-ratelimit-tokens-remaining"),
            N::from_static("anthropic-ratelimit-tokens-reset"),
        ];
        static ANTHROPIC_INPUT_TOKENS: [N; 3] = [
            N::from_static("anthropic-ratelimit-input-tokens-limit"),
            N::from_static("anthropic-ratelimit-input-tokens-remaining"),
            N::from_static("anthropic-ratelimit-input-tokens-reset"),
        ];
        let text = |name: &N| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        // Negative counts (`-1`, sent by some Azure deployments) mean "unknown".
        let count = |name: &N| text(name).and_then(|v| v.parse::<u64>().ok());
        let until = |name: &N| {
            text(name)
                .and_then(parse_rfc3339)
                .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
        };
        let [
            [limit_requests, remaining_requests, reset_requests],
            [limit_tokens, remaining_tokens, reset_tokens],
        ] = &super::limiter::OPENAI_RATE_HEADERS;
        let [a_limit_requests, a_remaining_requests, a_reset_requests] = &ANTHROPIC_REQUESTS;
        // Which of Anthropic's token families answers, asked only once an OpenAI
        // token header is missing (an OpenAI answer has them all).
        let family = std::cell::OnceCell::new();
        let a_tokens = |i: usize| {
            &family.get_or_init(|| {
                if ANTHROPIC_TOKENS.iter().any(|n| headers.contains_key(n)) {
                    &ANTHROPIC_TOKENS
                } else {
                    &ANTHROPIC_INPUT_TOKENS
                }
            })[i]
        };
        let limits = UpstreamLimits {
            limit_requests: count(limit_requests).or_else(|| count(a_limit_requests)),
            remaining_requests: count(remaining_requests).or_else(|| count(a_remaining_requests)),
            reset_requests: text(reset_requests)
                .and_then(parse_go_duration)
                .or_else(|| until(a_reset_requests)),
            limit_tokens: count(limit_tokens).or_else(|| count(a_tokens(0))),
            remaining_tokens: count(remaining_tokens).or_else(|| count(a_tokens(1))),
            reset_tokens: text(reset_tokens)
                .and_then(parse_go_duration)
                .or_else(|| until(a_tokens(2))),
        };
        (limits != UpstreamLimits::default()).then_some(limits)
    }
}

/// A Go duration as OpenAI sends it (`20ms`, `1s`, `6m0s`, `1m30.5s`), or bare seconds.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut total = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !is_number(c)).unwrap_or(rest.len());
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest.find(is_number).unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// An RFC 3339 timestamp (`2024-07-02T17:34:17Z`, `...17.5+02:00`).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let separator = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(separator(4, b"-")
        && separator(7, b"-")
        && separator(10, b"Tt ")
        && separator(13, b":")
        && separator(16, b":"))
    {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // A leap second reads as the second after it.
    if second > 60 {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 9 {
                nanos = nanos * 10 + u32::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return None;
        }
        nanos *= 10u32.pow(9u32.saturating_sub((at - start) as u32));
    }
    let offset = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) if separator(at + 3, b":") => {
            let minutes = digits(at + 1, 2)? * 60 + digits(at + 4, 2)?;
            at += 6;
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return None,
    };
    if at != b.len() {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset * 60;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    fn capacity(rpm: Option<u32>, tpm: Option<u32>) -> Arc<Capacity> {
        Arc::new(Capacity::new(CapacityConfig {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            ..CapacityConfig::default()
        }))
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Admit without waiting: `Some` when decided on the first poll.
    fn now_or_never(c: &Capacity, priority: u32, tokens: u32) -> Option<Result<(), Shed>> {
        c.admit(priority, tokens, far()).now_or_never()
    }

    /// Admit in a task; resolves with the time it took.
    fn spawn_admit(
        c: &Arc<Capacity>,
        priority: u32,
        tokens: u32,
    ) -> tokio::task::JoinHandle<(Result<(), Shed>, Duration)> {
        let c = c.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = c.admit(priority, tokens, far()).await;
            (r, start.elapsed())
        })
    }

    /// Let spawned tasks run up to their next wait, without moving the clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Requests admitted one after another over `span` of constant demand.
    async fn admitted_in(c: &Capacity, span: Duration) -> usize {
        let end = Instant::now() + span;
        let mut n = 0;
        while c.admit(0, 1, end).await.is_ok() && Instant::now() <= end {
            n += 1;
        }
        n
    }

    #[test]
    fn admit_is_send() {
        fn send<T: Send>(_: &T) {}
        let c = Capacity::new(CapacityConfig::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        send(&c.admit(0, 1, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn fast_path_admits_within_rate() {
        // 60 a minute: a 10-second burst of 10 goes at once, the 11th must wait.
        let c = capacity(Some(60), None);
        for i in 0..10 {
            assert_eq!(now_or_never(&c, 0, 1), Some(Ok(())), "request {i}");
        }
        assert_eq!(now_or_never(&c, 0, 1), None);
        assert_eq!(c.queued(), 0, "a dropped first poll leaves nothing behind");

        let unlimited = capacity(None, None);
        for _ in 0..10_000 {
            assert_eq!(now_or_never(&unlimited, 0, 100_000), Some(Ok(())));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn token_rate_limits_too() {
        // 600 tokens a minute: a burst of 100 tokens, 10 more each second.
        let c = capacity(None, Some(600));
        assert_eq!(now_or_never(&c, 0, 60), Some(Ok(())));
        assert_eq!(now_or_never(&c, 0, 60), None);
        let waiter = spawn_admit(&c, 0, 60);
        let (r, waited) = waiter.await.unwrap();
        assert_eq!(r, Ok(()));
        // 20 tokens left of the burst, 40 more to refill at 10 a second.
        assert_eq!(waited, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn saturated_bucket_queues_until_refill() {
        let c = capacity(Some(60), None);
        while now_or_never(&c, 0, 1).is_some() {}
        let waiter = spawn_admit(&c, 0, 1);
        settle().await;
        assert_eq!(c.queued(), 1);
        let (r, waited) = waiter.await.unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(
            waited,
            Duration::from_secs(1),
            "one request refills per second"
        );
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_goes_first_even_when_it_came_later() {
        let c = capacity(Some(60), None);
        while now_or_never(&c, 0, 1).is_some() {}
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [("free-1", 0), ("free-2", 0), ("paid", 10)] {
            let (c, order) = (c.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                c.admit(priority, 1, far()).await.unwrap();
                order.lock().unwrap().push(name);
            }));
            settle().await;
        }
        assert_eq!(c.queued(), 3);
        // A newcomer of the same priority as a waiter does not jump the queue either.
        assert_eq!(now_or_never(&c, 10, 1), None);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["paid", "free-1", "free-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_sheds_the_newcomer_or_displaces_the_lowest() {
        let c = Arc::new(Capacity::new(CapacityConfig {
            requests_per_minute: Some(60),
            max_queue: 2,
            ..CapacityConfig::default()
        }));
        while now_or_never(&c, 0, 1).is_some() {}
        let low = spawn_admit(&c, 1, 1);
        settle().await;
        let high = spawn_admit(&c, 5, 1);
        settle().await;
        assert_eq!(c.queued(), 2);

        // Equal to the lowest waiting: shed at once.
        match now_or_never(&c, 1, 1) {
            Some(Err(shed)) => {
                assert_eq!(shed.reason, ShedReason::QueueFull);
                // Two ahead and itself, one a second: about three seconds.
                assert!(
                    (Duration::from_secs(2)..=Duration::from_secs(3)).contains(&shed.retry_after),
                    "{shed:?}"
                );
            }
            other => panic!("expected a shed, got {other:?}"),
        }
        assert_eq!(c.queued(), 2);

        // Higher than the lowest: the priority-1 waiter loses its place.
        let mid = spawn_admit(&c, 3, 1);
        let (r, _) = low.await.unwrap();
        let shed = r.unwrap_err();
        assert_eq!(shed.reason, ShedReason::Displaced);
        assert!(shed.retry_after >= Duration::from_secs(1));
        assert_eq!(high.await.unwrap().0, Ok(()));
        assert_eq!(mid.await.unwrap().0, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_sheds_with_time_until_refill() {
        // 6 a minute: one every 10 s, a burst of one.
        let c = capacity(Some(6), None);
        assert_eq!(now_or_never(&c, 0, 1), Some(Ok(())));
        let start = Instant::now();
        let r = c.admit(0, 1, start + Duration::from_secs(3)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        let shed = r.unwrap_err();
        assert_eq!(shed.reason, ShedReason::Deadline);
        assert_eq!(
            shed.retry_after,
            Duration::from_secs(7),
            "the bucket refills at 10 s"
        );
        assert_eq!(c.queued(), 0);

        // The longest wait caps a far deadline.
        let c = Capacity::new(CapacityConfig {
            requests_per_minute: Some(1),
            max_wait: Duration::from_secs(2),
            ..CapacityConfig::default()
        });
        assert_eq!(now_or_never(&c, 0, 1), Some(Ok(())));
        let start = Instant::now();
        let shed = c.admit(0, 1, far()).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(shed.retry_after, Duration::from_secs(58));

        // A deadline already past does not queue.
        let shed = c
            .admit(0, 1, Instant::now())
            .now_or_never()
            .unwrap()
            .unwrap_err();
        assert_eq!(shed.reason, ShedReason::Deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiter_leaves_the_queue_and_hands_on_the_timer() {
        let c = capacity(Some(60), None);
        while now_or_never(&c, 0, 1).is_some() {}
        let head = spawn_admit(&c, 5, 1);
        settle().await;
        let next = spawn_admit(&c, 0, 1);
        settle().await;
        assert_eq!(c.queued(), 2);
        head.abort();
        assert!(head.await.unwrap_err().is_cancelled());
        assert_eq!(c.queued(), 1);
        let (r, waited) = next.await.unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(
            waited,
            Duration::from_secs(1),
            "the next waiter took over the timer"
        );
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_halves_the_rate_and_successes_restore_it() {
        let c = capacity(Some(120), None);
        // The first minute includes the 20-request burst; the second is the steady rate.
        let first = admitted_in(&c, MINUTE).await;
        assert!((139..=141).contains(&first), "{first}");
        let steady = admitted_in(&c, MINUTE).await;
        assert!((119..=121).contains(&steady), "{steady}");

        c.on_rate_limited(None);
        let halved = admitted_in(&c, MINUTE).await;
        assert!((59..=61).contains(&halved), "{halved}");

        // Another 429 cuts again; one within a second of it belongs to the same burst
        // of answers and does not.
        c.on_rate_limited(None);
        c.on_rate_limited(None);
        let once = admitted_in(&c, MINUTE).await;
        assert!((29..=31).contains(&once), "{once}");

        for _ in 0..20 {
            c.on_success();
        }
        let restored = admitted_in(&c, MINUTE).await;
        assert!((119..=121).contains(&restored), "{restored}");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_with_retry_after_pauses_then_trickles() {
        let c = capacity(Some(60), None);
        c.on_rate_limited(Some(Duration::from_secs(5)));
        let start = Instant::now();
        c.admit(0, 1, far()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Then 30 a minute (halved), from an empty bucket: every 2 s.
        c.admit(0, 1, far()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_no_traffic_to_learn_from_only_pauses() {
        let c = capacity(None, None);
        c.on_rate_limited(Some(Duration::from_secs(7)));
        let start = Instant::now();
        c.admit(0, 1, far()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        // No rate was invented: the next ones go at once.
        for _ in 0..50 {
            assert_eq!(now_or_never(&c, 0, 1), Some(Ok(())));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_configured_rate_a_429_learns_one() {
        let c = capacity(None, None);
        for _ in 0..40 {
            assert_eq!(now_or_never(&c, 0, 1), Some(Ok(())));
            c.on_success();
            tokio::time::advance(Duration::from_millis(1500)).await;
        }
        // 40 successes in the last minute; halved: 20 a minute.
        c.on_rate_limited(None);
        let learned = admitted_in(&c, MINUTE).await;
        assert!((19..=21).contains(&learned), "{learned}");
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_zero_pauses_until_the_reset() {
        let c = capacity(None, None);
        c.observe(&UpstreamLimits {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(2)),
            ..UpstreamLimits::default()
        });
        assert_eq!(now_or_never(&c, 0, 1), None);
        let start = Instant::now();
        c.admit(0, 1, far()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(
            now_or_never(&c, 0, 1),
            Some(Ok(())),
            "past the reset nothing holds"
        );

        // Two remaining tokens-wise: a third request's tokens wait for the reset.
        c.observe(&UpstreamLimits {
            remaining_tokens: Some(200),
            reset_tokens: Some(Duration::from_secs(3)),
            ..UpstreamLimits::default()
        });
        assert_eq!(now_or_never(&c, 0, 100), Some(Ok(())));
        assert_eq!(now_or_never(&c, 0, 100), Some(Ok(())));
        assert_eq!(now_or_never(&c, 0, 100), None);
    }

    #[tokio::test(start_paused = true)]
    async fn announced_limit_below_configured_wins() {
        let c = capacity(Some(600), None);
        c.observe(&UpstreamLimits {
            limit_requests: Some(60),
            ..UpstreamLimits::default()
        });
        let mut burst = 0;
        while now_or_never(&c, 0, 1).is_some() {
            burst += 1;
        }
        assert_eq!(burst, 10, "ten seconds of 60 a minute, not of 600");

        // A larger announced limit does not raise the configured one.
        let c = capacity(Some(60), None);
        c.observe(&UpstreamLimits {
            limit_requests: Some(6000),
            ..UpstreamLimits::default()
        });
        let mut burst = 0;
        while now_or_never(&c, 0, 1).is_some() {
            burst += 1;
        }
        assert_eq!(burst, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_burst_goes_when_the_bucket_is_full() {
        // 600 tokens a minute: a burst of 100, but one request needs 250.
        let c = Arc::new(Capacity::new(CapacityConfig {
            tokens_per_minute: Some(600),
            max_wait: Duration::from_secs(60),
            ..CapacityConfig::default()
        }));
        assert_eq!(now_or_never(&c, 0, 250), Some(Ok(())));
        // Its debt is paid back before the next one: 250 + 10 tokens at 10 a second,
        // less the 100-token burst.
        let (r, waited) = spawn_admit(&c, 0, 10).await.unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(waited, Duration::from_secs(16));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn openai_headers_are_read() {
        // As documented in OpenAI's rate-limit guide.
        let h = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(
            UpstreamLimits::from_headers(&h),
            Some(UpstreamLimits {
                limit_requests: Some(60),
                remaining_requests: Some(59),
                reset_requests: Some(Duration::from_secs(1)),
                limit_tokens: Some(150_000),
                remaining_tokens: Some(149_984),
                reset_tokens: Some(Duration::from_secs(360)),
            })
        );
        // Azure's "-1" means unknown.
        let azure = headers(&[
            ("x-ratelimit-limit-tokens", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-remaining-requests", "12"),
        ]);
        let l = UpstreamLimits::from_headers(&azure).unwrap();
        assert_eq!((l.limit_tokens, l.remaining_requests), (None, Some(12)));
        assert_eq!(
            UpstreamLimits::from_headers(&headers(&[("retry-after", "1")])),
            None
        );
    }

    #[test]
    fn anthropic_headers_are_read() {
        let now = UNIX_EPOCH + Duration::from_secs(1_719_941_650); // 2024-07-02T17:34:10Z
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2024-07-02T17:34:17Z"),
            ("anthropic-ratelimit-tokens-limit", "50000"),
            ("anthropic-ratelimit-tokens-remaining", "49500"),
            ("anthropic-ratelimit-tokens-reset", "2024-07-02T17:35:10.5Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
        ]);
        assert_eq!(
            UpstreamLimits::from_headers_at(&h, now),
            Some(UpstreamLimits {
                limit_requests: Some(50),
                remaining_requests: Some(49),
                reset_requests: Some(Duration::from_secs(7)),
                limit_tokens: Some(50_000),
                remaining_tokens: Some(49_500),
                reset_tokens: Some(Duration::from_millis(60_500)),
            })
        );

        // Only the split token headers: input tokens stand in; a reset in the past is 0.
        let split = headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2024-07-02T19:34:20+02:00",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-requests-reset", "2024-07-02T17:00:00Z"),
        ]);
        let l = UpstreamLimits::from_headers_at(&split, now).unwrap();
        assert_eq!(l.limit_tokens, Some(40_000));
        assert_eq!(l.remaining_tokens, Some(0));
        assert_eq!(l.reset_tokens, Some(Duration::from_secs(10)));
        assert_eq!(l.reset_requests, Some(Duration::ZERO));
        assert_eq!(l.limit_requests, None);
    }

    #[test]
    fn go_durations_parse() {
        for (text, ms) in [
            ("1s", 1000),
            ("20ms", 20),
            ("6m0s", 360_000),
            ("1m30.5s", 90_500),
            ("2h0m0s", 7_200_000),
            ("0s", 0),
            ("1.5", 1500),
            ("250us", 0),
        ] {
            assert_eq!(
                parse_go_duration(text).map(|d| d.as_millis()),
                Some(ms),
                "{text}"
            );
        }
        for bad in ["", "s", "5x", "1m-3s", "-1s", "abc"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_times_parse() {
        let at = |s| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_millis());
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(at("2024-07-02T17:34:17Z"), Some(1_719_941_657_000));
        assert_eq!(at("2024-07-02t17:34:17.25z"), Some(1_719_941_657_250));
        assert_eq!(at("2026-09-27T07:08:00-05:00"), Some(1_790_510_880_000));
        assert_eq!(
            at("2000-02-29T12:00:00+01:30"),
            Some(951_825_600_000 - 5_400_000)
        );
        for bad in [
            "2024-07-02",
            "2024-07-02T17:34:17",
            "2024-13-02T17:34:17Z",
            "2024-07-02T17:34:17.Z",
            "2024-07-02T17:34:17Z trailing",
            "yesterday",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }
}
