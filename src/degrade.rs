//! Degradation, not failure: time budgets and circuit breakers around the session store and
//! the vector index. A dependency that is down or slow then costs a request at most its budget
//! once, and nothing while the breaker is open; the caller gets `Unavailable` at once and
//! serves a degraded answer (the pipeline) or a 503 with `Retry-After` (events).
//!
//! Why a breaker and not only a timeout: with Redis gone, every recommendation would wait the
//! full budget (50 ms) before giving up, which at a few hundred requests per second fills the
//! concurrency limit with waiting requests. With the breaker open they skip the session read
//! and answer in the usual time. After `cooldown` one request probes the dependency
//! (half-open); its success closes the breaker, so recovery takes at most about one cooldown.

use crate::domain::{Filter, ItemId, UserId};
use crate::index::{
    Hit, IndexError, IndexPoint, LivePoint, Payload, PayloadPatch, ScrollPage, Vector, VectorIndex,
};
use crate::session::{Actor, AppendOutcome, Event, RecentItem, SessionError, SessionStore};
use crate::telemetry;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// How long calls may take and how long a tripped breaker stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Reads on the request path (recent activity, history, trending, cache, search).
    pub read: Duration,
    /// Writes (event appends, upserts): longer, because a write that times out may still
    /// land and would only come back as a duplicate on the client's retry.
    pub write: Duration,
    /// How long an open breaker refuses calls before letting one probe through.
    pub cooldown: Duration,
}

/// Timeouts in a row that open a closed breaker. An outage error (connection refused, a
/// dead socket) opens it at once; a slow answer on a saturated CPU is not an outage until
/// it repeats, or one late read would refuse every event for a cooldown. Calls that were
/// in flight together count once: a 55 ms stall of this process's own runtime timed out
/// every read in flight at once, and opened the breaker for a store that had answered
/// (BENCHMARKS.md, 2026-12-04). A timeout counts only if its call started after the last
/// counted one, so the third takes three budgets in a row.
pub const TIMEOUTS_TO_OPEN: u32 = 3;

/// A circuit breaker: closed (calls go through), open (calls fail at once) until the
/// cooldown ends, then half-open (one probe goes through; the others still fail at once).
#[derive(Debug)]
pub struct Breaker {
    name: &'static str,
    cooldown: Duration,
    state: Mutex<BreakerState>,
    /// Counted timeouts since the last answer.
    timeouts: AtomicU32,
    /// When the last counted timeout was seen.
    last_timeout: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is out; its lease ends at `until`, when another caller may probe (a probe
    /// future that is never polled again, and never dropped, cannot hold the breaker).
    Probing {
        until: Instant,
    },
}

/// How long a half-open probe may stay out before another caller may probe. Longer than any
/// call's budget (a request's whole timeout), so a live probe is normally never doubled.
pub const PROBE_LEASE: Duration = Duration::from_secs(10);

/// Held by the half-open probe while its call runs. Dropped before the call reported back
/// (the caller's future was cancelled: a request timeout, a client that went away), it
/// reopens the breaker with the cooldown already over, so the next caller probes at once
/// instead of every caller being refused for good.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.breaker.state.lock();
        if matches!(*state, BreakerState::Probing { .. }) {
            tracing::info!(
                dependency = self.breaker.name,
                "half-open probe was cancelled before it answered; the next call probes"
            );
            *state = BreakerState::Open {
                until: Instant::now(),
            };
        }
    }
}

impl Breaker {
    /// `name` labels the `tandem_dependency_up` gauge (`session`, `index`).
    pub fn new(name: &'static str, cooldown: Duration) -> Self {
        telemetry::set_dependency_up(name, true);
        Breaker {
            name,
            cooldown,
            state: Mutex::new(BreakerState::Closed),
            timeouts: AtomicU32::new(0),
            last_timeout: Mutex::new(None),
        }
    }

    /// Whether a call may go to the dependency now. In the half-open state exactly one
    /// caller gets `true` (the probe) until it reports back.
    pub fn allow(&self) -> bool {
        self.admit().is_some()
    }

    /// Like [`Breaker::allow`]; `Some(true)` when this caller is the half-open probe.
    fn admit(&self) -> Option<bool> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match *state {
            BreakerState::Closed => Some(false),
            BreakerState::Open { until } | BreakerState::Probing { until } if now >= until => {
                *state = BreakerState::Probing {
                    until: now + PROBE_LEASE,
                };
                Some(true)
            }
            BreakerState::Open { .. } | BreakerState::Probing { .. } => None,
        }
    }

    /// Whether the dependency is believed up (closed or probing after a success).
    pub fn is_closed(&self) -> bool {
        *self.state.lock() == BreakerState::Closed
    }

    pub fn record_success(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        let mut state = self.state.lock();
        if *state != BreakerState::Closed {
            tracing::info!(
                dependency = self.name,
                "dependency answers again; breaker closed"
            );
            telemetry::set_dependency_up(self.name, true);
            *state = BreakerState::Closed;
        }
    }

    pub fn record_failure(&self, reason: &str) {
        let mut state = self.state.lock();
        if *state == BreakerState::Closed {
            tracing::warn!(
                dependency = self.name,
                reason,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "dependency unavailable; breaker open, serving degraded"
            );
        }
        telemetry::set_dependency_up(self.name, false);
        *state = BreakerState::Open {
            until: Instant::now() + self.cooldown,
        };
    }

    /// A call started at `started` ran past its budget: opens the breaker on the
    /// [`TIMEOUTS_TO_OPEN`]th in a row (not counting calls that overlapped the last counted
    /// one), or at once when it was the half-open probe.
    pub fn record_timeout(&self, reason: &str, started: Instant) {
        if matches!(*self.state.lock(), BreakerState::Probing { .. }) {
            self.record_failure(reason);
            return;
        }
        {
            let mut last = self.last_timeout.lock();
            if last.is_some_and(|t| started < t) {
                return;
            }
            *last = Some(Instant::now());
        }
        let n = self.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= TIMEOUTS_TO_OPEN {
            self.record_failure(reason);
        }
    }

    /// Runs `call` under the breaker and `budget`. Only `is_outage` errors and timeouts trip
    /// the breaker: a rejected request (bad data, a missing collection) says nothing about
    /// whether the dependency is up.
    async fn run<T, E>(
        &self,
        what: &str,
        budget: Duration,
        call: impl Future<Output = Result<T, E>>,
        unavailable: impl Fn(String) -> E,
        is_outage: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        let Some(probe) = self.admit() else {
            return Err(unavailable(format!(
                "{what}: {} marked down, retrying within {} ms",
                self.name,
                self.cooldown.as_millis()
            )));
        };
        let mut guard = ProbeGuard {
            breaker: self,
            armed: probe,
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(budget, call).await;
        // From here on the outcome is recorded below, whatever it is.
        guard.armed = false;
        match answer {
            Ok(Ok(v)) => {
                self.record_success();
                Ok(v)
            }
            Ok(Err(e)) => {
                if is_outage(&e) {
                    self.record_failure(what);
                } else {
                    // The dependency answered, so it is up; a probe must not stay stuck.
                    self.record_success();
                }
                Err(e)
            }
            Err(_) => {
                let reason = format!("{what}: no answer within {} ms", budget.as_millis());
                self.record_timeout(&reason, started);
                Err(unavailable(reason))
            }
        }
    }
}

/// The session store behind budgets and a breaker. Reads past `budgets.read` (50 ms by
/// default) fail as [`SessionError::Unavailable`], which the pipeline turns into
/// `degraded:["session"]` and the events handler into 503 + `Retry-After`.
pub struct GuardedSession {
    inner: Arc<dyn SessionStore>,
    budgets: Budgets,
    breaker: Breaker,
}

impl GuardedSession {
    pub fn new(inner: Arc<dyn SessionStore>, budgets: Budgets) -> Self {
        GuardedSession {
            inner,
            budgets,
            breaker: Breaker::new("session", budgets.cooldown),
        }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    async fn read<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, SessionError> {
        self.breaker
            .run(
                what,
                self.budgets.read,
                call,
                SessionError::Unavailable,
                session_outage,
            )
            .await
    }

    async fn write<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, SessionError> {
        self.breaker
            .run(
                what,
                self.budgets.write,
                call,
                SessionError::Unavailable,
                session_outage,
            )
            .await
    }
}

fn session_outage(e: &SessionError) -> bool {
    matches!(e, SessionError::Unavailable(_))
}

#[async_trait]
impl SessionStore for GuardedSession {
    async fn append(&self, events: &[Event]) -> Result<AppendOutcome, SessionError> {
        self.write("append events", self.inner.append(events)).await
    }

    async fn read_log(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Event>, SessionError> {
        // An export, not a request-path read: no budget beyond the store's own.
        self.inner.read_log(from_ms, to_ms).await
    }

    async fn recent(&self, actor: &Actor, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        self.read("recent activity", self.inner.recent(actor, limit))
            .await
    }

    async fn history(&self, user: &UserId, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        self.read("history", self.inner.history(user, limit)).await
    }

    async fn user_activity(
        &self,
        user: &UserId,
        recent_limit: usize,
        history_limit: usize,
    ) -> Result<(Vec<RecentItem>, Vec<RecentItem>), SessionError> {
        self.read(
            "user activity",
            self.inner.user_activity(user, recent_limit, history_limit),
        )
        .await
    }

    async fn seed_history(&self, user: &UserId, items: &[RecentItem]) -> Result<(), SessionError> {
        self.write("seed history", self.inner.seed_history(user, items))
            .await
    }

    async fn trending(
        &self,
        category: Option<&str>,
        k: usize,
    ) -> Result<Vec<(ItemId, f64)>, SessionError> {
        self.read("trending", self.inner.trending(category, k))
            .await
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, SessionError> {
        self.read("cache get", self.inner.cache_get(key)).await
    }

    async fn cache_set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), SessionError> {
        self.read("cache set", self.inner.cache_set(key, value, ttl))
            .await
    }

    async fn ping(&self) -> Result<(), SessionError> {
        // Readiness wants the truth, so the ping ignores an open breaker; its success closes
        // the breaker early.
        match tokio::time::timeout(self.budgets.write, self.inner.ping()).await {
            Ok(Ok(())) => {
                self.breaker.record_success();
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::Unavailable(format!(
                "ping: no answer within {} ms",
                self.budgets.write.as_millis()
            ))),
        }
    }

    async fn incr_counters(&self, key: &str, deltas: &[(String, i64)]) -> Result<(), SessionError> {
        // Experiment counts: a write, off the request path (attribution runs in a task).
        self.write("increment counters", self.inner.incr_counters(key, deltas))
            .await
    }

    async fn read_counters(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, i64>, SessionError> {
        // Read by the admin report, not on the request path.
        self.write("read counters", self.inner.read_counters(key))
            .await
    }
}

/// The vector index behind a breaker, with the read budget on searches and fetches. Version
/// management (create, finalize, switch) passes straight through: it is offline work that may
/// legitimately take minutes.
pub struct GuardedIndex {
    inner: Arc<dyn VectorIndex>,
    budgets: Budgets,
    breaker: Breaker,
}

impl GuardedIndex {
    pub fn new(inner: Arc<dyn VectorIndex>, budgets: Budgets) -> Self {
        GuardedIndex {
            inner,
            budgets,
            breaker: Breaker::new("index", budgets.cooldown),
        }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    async fn guarded<T>(
        &self,
        what: &str,
        budget: Duration,
        call: impl Future<Output = Result<T, IndexError>>,
    ) -> Result<T, IndexError> {
        self.breaker
            .run(what, budget, call, IndexError::Unavailable, |e| {
                matches!(e, IndexError::Unavailable(_))
            })
            .await
    }
}

#[async_trait]
impl VectorIndex for GuardedIndex {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.guarded("upsert", self.budgets.write, self.inner.upsert(points))
            .await
    }

    async fn upsert_buffered(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.guarded(
            "upsert",
            self.budgets.write,
            self.inner.upsert_buffered(points),
        )
        .await
    }

    async fn flush(&self) -> Result<(), IndexError> {
        self.guarded("flush", self.budgets.write, self.inner.flush())
            .await
    }

    /// Unguarded: a stop's last step, which takes about a second at 1M points.
    async fn save_snapshot(&self) -> Result<(), IndexError> {
        self.inner.save_snapshot().await
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        self.guarded("delete", self.budgets.write, self.inner.delete(ids))
            .await
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        self.guarded(
            "set payload",
            self.budgets.write,
            self.inner.set_payload(id, patch),
        )
        .await
    }

    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.guarded(
            "search",
            self.budgets.read,
            self.inner.search(vector, filter, k),
        )
        .await
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError> {
        self.guarded("fetch", self.budgets.read, self.inner.fetch(ids))
            .await
    }

    async fn count(&self) -> Result<usize, IndexError> {
        self.guarded("count", self.budgets.write, self.inner.count())
            .await
    }

    async fn fetch_live(
        &self,
        version: Option<&str>,
        ids: &[ItemId],
    ) -> Result<Vec<LivePoint>, IndexError> {
        self.guarded(
            "fetch",
            self.budgets.read,
            self.inner.fetch_live(version, ids),
        )
        .await
    }

    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        self.inner.create_version(version, dim).await
    }

    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.inner.upsert_into(version, points).await
    }

    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.guarded(
            "search",
            self.budgets.read,
            self.inner.search_in(version, vector, filter, k),
        )
        .await
    }

    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError> {
        self.guarded(
            "fetch",
            self.budgets.read,
            self.inner.fetch_from(version, ids),
        )
        .await
    }

    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        self.guarded(
            "delete",
            self.budgets.write,
            self.inner.delete_from(version, ids),
        )
        .await
    }

    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        self.guarded(
            "set payload",
            self.budgets.write,
            self.inner.set_payload_in(version, id, patch),
        )
        .await
    }

    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        self.inner.finalize_version(version).await
    }

    async fn switch_to(&self, version: &str) -> Result<(), IndexError> {
        self.inner.switch_to(version).await
    }

    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        self.inner.drop_version(version).await
    }

    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError> {
        self.inner.versions().await
    }

    /// Under the breaker with the write budget (a page of thousands of points, at start-up).
    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        self.guarded(
            "scroll",
            self.budgets.write,
            self.inner.scroll(version, offset, limit),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A store whose reads take `delay` and fail while `down` is set; counts the calls that
    /// reached it, so the tests can see the breaker keep traffic away.
    struct Flaky {
        down: AtomicBool,
        delay: Mutex<Duration>,
        calls: AtomicUsize,
    }

    impl Flaky {
        fn new() -> Arc<Self> {
            Arc::new(Flaky {
                down: AtomicBool::new(false),
                delay: Mutex::new(Duration::ZERO),
                calls: AtomicUsize::new(0),
            })
        }

        async fn answer<T>(&self, v: T) -> Result<T, SessionError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = *self.delay.lock();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if self.down.load(Ordering::SeqCst) {
                Err(SessionError::Unavailable("connection refused".into()))
            } else {
                Ok(v)
            }
        }
    }

    #[async_trait]
    impl SessionStore for Flaky {
        async fn append(&self, events: &[Event]) -> Result<AppendOutcome, SessionError> {
            self.answer(AppendOutcome {
                accepted: events.len(),
                duplicates: 0,
            })
            .await
        }
        async fn read_log(&self, _: i64, _: i64) -> Result<Vec<Event>, SessionError> {
            self.answer(vec![]).await
        }
        async fn recent(&self, _: &Actor, _: usize) -> Result<Vec<RecentItem>, SessionError> {
            self.answer(vec![]).await
        }
        async fn history(&self, _: &UserId, _: usize) -> Result<Vec<RecentItem>, SessionError> {
            self.answer(vec![]).await
        }
        async fn seed_history(&self, _: &UserId, _: &[RecentItem]) -> Result<(), SessionError> {
            self.answer(()).await
        }
        async fn trending(
            &self,
            _: Option<&str>,
            _: usize,
        ) -> Result<Vec<(ItemId, f64)>, SessionError> {
            self.answer(vec![]).await
        }
        async fn cache_get(&self, _: &str) -> Result<Option<Vec<u8>>, SessionError> {
            Err(SessionError::Backend("WRONGTYPE".into()))
        }
        async fn cache_set(&self, _: &str, _: &[u8], _: Duration) -> Result<(), SessionError> {
            self.answer(()).await
        }
        async fn ping(&self) -> Result<(), SessionError> {
            self.answer(()).await
        }
        async fn incr_counters(&self, _: &str, _: &[(String, i64)]) -> Result<(), SessionError> {
            self.answer(()).await
        }
        async fn read_counters(
            &self,
            _: &str,
        ) -> Result<std::collections::HashMap<String, i64>, SessionError> {
            self.answer(Default::default()).await
        }
    }

    /// Short enough for fast tests on real time (tokio's paused clock needs a feature the
    /// build does not enable), long enough to be far from scheduling noise.
    const BUDGETS: Budgets = Budgets {
        read: Duration::from_millis(50),
        write: Duration::from_millis(500),
        cooldown: Duration::from_millis(300),
    };

    fn user() -> Actor {
        Actor::User(UserId::parse("u1").unwrap())
    }

    #[tokio::test]
    async fn a_slow_store_costs_a_few_budgets_then_nothing_until_the_cooldown_ends() {
        let store = Flaky::new();
        *store.delay.lock() = Duration::from_millis(400);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);

        // Each late answer costs one budget; the breaker stays closed until the third in a
        // row, so one slow read on a busy CPU does not take the dependency out.
        for n in 1..=TIMEOUTS_TO_OPEN {
            let started = Instant::now();
            let err = guarded.recent(&user(), 10).await.unwrap_err();
            assert!(
                matches!(err, SessionError::Unavailable(ref m) if m.contains("50 ms")),
                "{err}"
            );
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(50) && took < Duration::from_millis(300),
                "{took:?}"
            );
            assert_eq!(
                guarded.breaker().is_closed(),
                n < TIMEOUTS_TO_OPEN,
                "timeout {n}"
            );
        }

        // While open: an immediate Unavailable, and the store is not called.
        let started = Instant::now();
        for _ in 0..100 {
            assert!(matches!(
                guarded.recent(&user(), 10).await,
                Err(SessionError::Unavailable(_))
            ));
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            store.calls.load(Ordering::SeqCst),
            TIMEOUTS_TO_OPEN as usize
        );
    }

    #[tokio::test]
    async fn timeouts_of_calls_in_flight_together_count_once() {
        // As when the runtime itself stalls: every read in flight misses its budget at once.
        let store = Flaky::new();
        *store.delay.lock() = Duration::from_millis(200);
        let guarded = Arc::new(GuardedSession::new(store.clone(), BUDGETS));
        let reads: Vec<_> = (0..8)
            .map(|_| {
                let g = guarded.clone();
                tokio::spawn(async move { g.recent(&user(), 10).await })
            })
            .collect();
        for r in reads {
            assert!(r.await.unwrap().is_err());
        }
        assert!(guarded.breaker().is_closed(), "one slow spell, not three");
        // Calls that keep timing out one after another are an outage.
        for _ in 1..TIMEOUTS_TO_OPEN {
            assert!(guarded.recent(&user(), 10).await.is_err());
        }
        assert!(!guarded.breaker().is_closed());
    }

    #[tokio::test]
    async fn an_answer_between_timeouts_keeps_the_breaker_closed() {
        let store = Flaky::new();
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        for _ in 0..3 {
            for _ in 1..TIMEOUTS_TO_OPEN {
                *store.delay.lock() = Duration::from_millis(200);
                assert!(guarded.recent(&user(), 10).await.is_err());
            }
            *store.delay.lock() = Duration::ZERO;
            assert!(guarded.recent(&user(), 10).await.is_ok());
        }
        assert!(guarded.breaker().is_closed());
    }

    #[tokio::test]
    async fn recovery_is_seen_within_one_cooldown() {
        let store = Flaky::new();
        store.down.store(true, Ordering::SeqCst);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(guarded
            .history(&UserId::parse("u1").unwrap(), 5)
            .await
            .is_err());
        store.down.store(false, Ordering::SeqCst);

        // The store is back, but the breaker is still open: callers keep degrading...
        assert!(guarded.recent(&user(), 10).await.is_err());
        // ...until the cooldown has passed, when one probe goes through and closes it.
        tokio::time::sleep(BUDGETS.cooldown + Duration::from_millis(20)).await;
        assert!(guarded.recent(&user(), 10).await.is_ok());
        assert!(guarded.breaker().is_closed());
        assert!(guarded.trending(None, 10).await.is_ok());
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_and_only_one_caller_probes() {
        let store = Flaky::new();
        store.down.store(true, Ordering::SeqCst);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(guarded.recent(&user(), 1).await.is_err());
        tokio::time::sleep(BUDGETS.cooldown + Duration::from_millis(20)).await;

        let breaker = guarded.breaker();
        assert!(
            breaker.allow(),
            "the first caller after the cooldown probes"
        );
        assert!(
            !breaker.allow(),
            "a second caller waits for the probe's answer"
        );
        breaker.record_failure("probe failed");
        assert!(!breaker.allow(), "a failed probe opens the breaker again");
        tokio::time::sleep(BUDGETS.cooldown + Duration::from_millis(20)).await;
        assert!(breaker.allow());
    }

    #[tokio::test]
    async fn a_dropped_probe_does_not_leave_the_breaker_half_open() {
        let store = Flaky::new();
        store.down.store(true, Ordering::SeqCst);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(guarded.recent(&user(), 1).await.is_err());
        tokio::time::sleep(BUDGETS.cooldown + Duration::from_millis(20)).await;
        // The store is back but slow; the probe's caller gives up (a request timeout, a client
        // that went away) before the probe's own budget ends, which drops the probe future.
        store.down.store(false, Ordering::SeqCst);
        *store.delay.lock() = Duration::from_secs(5);
        let dropped =
            tokio::time::timeout(Duration::from_millis(10), guarded.recent(&user(), 1)).await;
        assert!(dropped.is_err(), "the probe was cancelled");
        // The next caller probes in its place, and its answer closes the breaker.
        *store.delay.lock() = Duration::ZERO;
        assert!(guarded.recent(&user(), 1).await.is_ok());
        assert!(guarded.breaker().is_closed());
    }

    #[tokio::test]
    async fn writes_fail_fast_while_open_so_events_can_answer_503_at_once() {
        let store = Flaky::new();
        store.down.store(true, Ordering::SeqCst);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(guarded.recent(&user(), 1).await.is_err());
        let calls = store.calls.load(Ordering::SeqCst);
        let err = guarded.append(&[]).await.unwrap_err();
        assert!(
            matches!(err, SessionError::Unavailable(ref m) if m.contains("session marked down")),
            "{err}"
        );
        assert_eq!(store.calls.load(Ordering::SeqCst), calls);
    }

    #[tokio::test]
    async fn a_rejected_call_is_not_an_outage() {
        let store = Flaky::new();
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(matches!(
            guarded.cache_get("k").await,
            Err(SessionError::Backend(_))
        ));
        assert!(guarded.breaker().is_closed());
    }

    #[tokio::test]
    async fn ping_sees_through_an_open_breaker_and_closes_it() {
        let store = Flaky::new();
        store.down.store(true, Ordering::SeqCst);
        let guarded = GuardedSession::new(store.clone(), BUDGETS);
        assert!(guarded.recent(&user(), 1).await.is_err());
        store.down.store(false, Ordering::SeqCst);
        guarded.ping().await.unwrap();
        assert!(guarded.breaker().is_closed());
        assert!(guarded.recent(&user(), 1).await.is_ok());
    }
}
