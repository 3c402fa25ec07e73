//! The session store contract, run against every backend: memory, Redis on 127.0.0.1:6379
//! with a unique key prefix per test, and a real three-node Redis Cluster that each test
//! starts on free ports; plus the memory log's crash safety and the Redis backend's
//! behaviour while Redis is down.

mod common;

use common::{eventually, free_port, redis_url, RedisServer};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::config::{SessionBackend, Settings};
use tandem::domain::{EventType, ItemId, SessionId, UserId};
use tandem::session::{
    self, Actor, Event, MemoryStore, RecentItem, RedisStore, SessionError, SessionStore,
};

const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
    RedisCluster,
}

/// One store under test, with what it needs to be reopened and cleaned up.
struct Harness {
    store: Arc<dyn SessionStore>,
    settings: Settings,
    redis: Option<Arc<RedisStore>>,
    _cluster: Option<RedisCluster>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn new(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        settings.session.redis_url = redis_url();
        settings.session.key_prefix = format!("tandem-test-{}", uuid::Uuid::new_v4().simple());
        settings.session.backend = match backend {
            Backend::Memory => SessionBackend::Memory,
            Backend::Redis | Backend::RedisCluster => SessionBackend::Redis,
        };
        let cluster =
            matches!(backend, Backend::RedisCluster).then(|| RedisCluster::start(dir.path()));
        if let Some(c) = &cluster {
            settings.session.redis_url = c.urls();
            settings.session.redis_cluster = true;
        }
        tweak(&mut settings);
        settings.validate().unwrap();
        let mut h = Harness {
            store: Arc::new(NoStore),
            settings,
            redis: None,
            _cluster: cluster,
            _dir: dir,
        };
        h.reopen().await;
        h
    }

    /// Drops the store and opens it again from what it persisted (a restart).
    async fn reopen(&mut self) {
        self.store = Arc::new(NoStore); // release the memory log's lock first
        match self.settings.session.backend {
            SessionBackend::Memory => {
                self.store = session::open(&self.settings).await.unwrap();
            }
            SessionBackend::Redis => {
                let r = Arc::new(RedisStore::connect(&self.settings.session).await.unwrap());
                r.ping().await.expect(
                    "Redis must be up on 127.0.0.1:6379 (or the test's cluster) for the contract tests",
                );
                self.redis = Some(r.clone());
                self.store = r;
            }
        }
    }

    /// Deletes the test's keys from the shared Redis. A test's own cluster goes away with it.
    async fn cleanup(self) {
        if let (Some(r), None) = (&self.redis, &self._cluster) {
            r.delete_all_keys().await.unwrap();
        }
    }
}

/// A placeholder while a store is being reopened.
struct NoStore;

#[async_trait::async_trait]
impl SessionStore for NoStore {
    async fn append(&self, _: &[Event]) -> Result<session::AppendOutcome, SessionError> {
        unreachable!()
    }
    async fn read_log(&self, _: i64, _: i64) -> Result<Vec<Event>, SessionError> {
        unreachable!()
    }
    async fn recent(&self, _: &Actor, _: usize) -> Result<Vec<RecentItem>, SessionError> {
        unreachable!()
    }
    async fn history(&self, _: &UserId, _: usize) -> Result<Vec<RecentItem>, SessionError> {
        unreachable!()
    }
    async fn seed_history(&self, _: &UserId, _: &[RecentItem]) -> Result<(), SessionError> {
        unreachable!()
    }
    async fn trending(
        &self,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<(ItemId, f64)>, SessionError> {
        unreachable!()
    }
    async fn cache_get(&self, _: &str) -> Result<Option<Vec<u8>>, SessionError> {
        unreachable!()
    }
    async fn cache_set(&self, _: &str, _: &[u8], _: Duration) -> Result<(), SessionError> {
        unreachable!()
    }
    async fn ping(&self) -> Result<(), SessionError> {
        unreachable!()
    }
    async fn incr_counters(&self, _: &str, _: &[(String, i64)]) -> Result<(), SessionError> {
        unreachable!()
    }
    async fn read_counters(
        &self,
        _: &str,
    ) -> Result<std::collections::HashMap<String, i64>, SessionError> {
        unreachable!()
    }
}

fn now_ms() -> i64 {
    session::event::now_ms()
}

fn event(user: Option<&str>, session: Option<&str>, item: &str, t: EventType, ts: i64) -> Event {
    Event {
        event_id: uuid::Uuid::new_v4(),
        user_id: user.map(|u| UserId::parse(u).unwrap()),
        session_id: session.map(|s| SessionId::parse(s).unwrap()),
        item_id: ItemId::parse(item).unwrap(),
        event_type: t,
        value: None,
        timestamp_ms: ts,
        variant: None,
        context: None,
        categories: Vec::new(),
    }
}

fn ids(items: &[RecentItem]) -> Vec<&str> {
    items.iter().map(|r| r.item_id.as_str()).collect()
}

fn user(u: &str) -> Actor {
    Actor::User(UserId::parse(u).unwrap())
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Backend::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$name(super::Backend::RedisCluster).await
            }
        })*
    };
}

contract!(
    idempotent_on_event_id,
    recent_lists_are_capped_and_expire,
    history_is_bounded_and_seedable,
    trending_decays_with_age,
    trending_forgets_buckets_that_leave_the_window,
    trending_forgets_a_bucket_of_many_items,
    export_round_trips_through_the_common_format,
    concurrent_appends_lose_nothing,
    cache_entries_expire,
    read_log_filters_by_time,
    counters_add_up_across_concurrent_writers,
);

async fn idempotent_on_event_id(backend: Backend) {
    let mut h = Harness::new(backend, |_| {}).await;
    let now = now_ms();
    let a = event(Some("u1"), None, "i1", EventType::Click, now);
    let b = event(Some("u1"), None, "i2", EventType::Click, now);
    let out = h
        .store
        .append(&[a.clone(), b.clone(), a.clone()])
        .await
        .unwrap();
    assert_eq!(
        (out.accepted, out.duplicates),
        (2, 1),
        "a repeat inside a batch counts once"
    );

    let c = event(Some("u1"), None, "i3", EventType::Click, now);
    let out = h.store.append(&[b.clone(), c.clone()]).await.unwrap();
    assert_eq!(
        (out.accepted, out.duplicates),
        (1, 1),
        "a resent event counts once"
    );

    // After a restart the store still knows every id it accepted.
    h.reopen().await;
    let out = h
        .store
        .append(&[a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    assert_eq!(
        (out.accepted, out.duplicates),
        (0, 3),
        "idempotency survives a restart"
    );

    let log = h.store.read_log(0, i64::MAX).await.unwrap();
    let logged: Vec<uuid::Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(
        logged,
        vec![a.event_id, b.event_id, c.event_id],
        "each event logged once, in order"
    );
    let recent = h.store.recent(&user("u1"), 10).await.unwrap();
    assert_eq!(
        ids(&recent),
        ["i3", "i2", "i1"],
        "duplicates do not enter the session twice"
    );
    let trending = h.store.trending(None, 10).await.unwrap();
    assert!(
        trending.iter().all(|(_, s)| (*s - 2.0).abs() < 1e-9),
        "one click each: {trending:?}"
    );
    h.cleanup().await;
}

async fn recent_lists_are_capped_and_expire(backend: Backend) {
    let ttl = Duration::from_millis(1_500);
    let h = Harness::new(backend, |s| {
        s.session.recent_cap = 3;
        s.session.session_recent_ttl_secs = ttl.as_secs_f64();
    })
    .await;
    let appended = Instant::now();
    let now = now_ms();
    let events: Vec<Event> = (0..5)
        .map(|i| {
            event(
                Some("u1"),
                Some("s1"),
                &format!("i{i}"),
                EventType::View,
                now - 5000 + i,
            )
        })
        .collect();
    h.store.append(&events).await.unwrap();
    // Impressions are logged but are no signal of interest: they stay out of the lists.
    h.store
        .append(&[event(
            Some("u1"),
            Some("s1"),
            "shown",
            EventType::Impression,
            now,
        )])
        .await
        .unwrap();
    let session = Actor::Session(SessionId::parse("s1").unwrap());
    let listed = h.store.recent(&session, 10).await.unwrap();
    // Exact only if the read came before the TTL could have run out (a stalled box may
    // take longer; the cap is then still checked on the user's list below).
    if appended.elapsed() < ttl {
        assert_eq!(ids(&listed), ["i4", "i3", "i2"]);
    }
    assert_eq!(
        ids(&h.store.recent(&user("u1"), 2).await.unwrap()),
        ["i4", "i3"]
    );
    assert_eq!(
        h.store.recent(&user("u1"), 10).await.unwrap()[0].event_type,
        EventType::View
    );
    assert!(h
        .store
        .recent(&user("nobody"), 10)
        .await
        .unwrap()
        .is_empty());

    // The session list expires after its TTL: waited for, with a deadline, rather than
    // assumed after a fixed sleep.
    eventually(
        "the session list expires after its TTL",
        Duration::from_secs(20),
        || async { h.store.recent(&session, 10).await.unwrap().is_empty() },
    )
    .await;
    assert_eq!(
        h.store.recent(&user("u1"), 10).await.unwrap().len(),
        3,
        "user lists keep their own, longer TTL"
    );

    // A new event after expiry starts a fresh list rather than resurrecting the old one.
    h.store
        .append(&[event(None, Some("s1"), "i9", EventType::Click, now_ms())])
        .await
        .unwrap();
    assert_eq!(ids(&h.store.recent(&session, 10).await.unwrap()), ["i9"]);
    h.cleanup().await;
}

async fn history_is_bounded_and_seedable(backend: Backend) {
    let h = Harness::new(backend, |s| s.session.history_cap = 4).await;
    let u = UserId::parse("onboarded").unwrap();
    let seed: Vec<RecentItem> = ["s2", "s1"]
        .iter()
        .map(|i| RecentItem {
            item_id: ItemId::parse(*i).unwrap(),
            event_type: EventType::Click,
            timestamp_ms: 1,
        })
        .collect();
    h.store.seed_history(&u, &seed).await.unwrap();
    assert_eq!(ids(&h.store.history(&u, 10).await.unwrap()), ["s2", "s1"]);
    let now = now_ms();
    let events: Vec<Event> = (0..3)
        .map(|i| {
            event(
                Some("onboarded"),
                None,
                &format!("e{i}"),
                EventType::Purchase,
                now + i,
            )
        })
        .collect();
    h.store.append(&events).await.unwrap();
    assert_eq!(
        ids(&h.store.history(&u, 10).await.unwrap()),
        ["e2", "e1", "e0", "s2"],
        "capped at 4, newest first"
    );
    assert!(
        h.store.read_log(0, i64::MAX).await.unwrap().len() == 3,
        "seeds are not events"
    );
    // The request path reads both lists in one call; it answers what the two calls do.
    let (recent, history) = h.store.user_activity(&u, 2, 3).await.unwrap();
    assert_eq!(ids(&recent), ["e2", "e1"]);
    assert_eq!(ids(&history), ["e2", "e1", "e0"]);
    let (recent, history) = h.store.user_activity(&u, 0, 10).await.unwrap();
    assert!(recent.is_empty(), "a zero limit reads nothing");
    assert_eq!(history.len(), 4);
    h.cleanup().await;
}

async fn trending_decays_with_age(backend: Backend) {
    let h = Harness::new(backend, |s| {
        s.session.trending_half_life_secs = 3600.0;
        s.session.trending_bucket_secs = 3600;
        s.session.trending_buckets = 24;
    })
    .await;
    let now = now_ms();
    let mut events = Vec::new();
    // "old" was popular five hours ago: 10 views, each worth 2^-5 now.
    for _ in 0..10 {
        let mut e = event(Some("u"), None, "old", EventType::View, now - 5 * HOUR_MS);
        e.categories = vec!["Drama".into()];
        events.push(e);
    }
    // "hot" has 2 views now, "warm" 1 view now, "bought" one purchase (weight 8) now.
    events.push(event(Some("u"), None, "hot", EventType::View, now));
    events.push(event(Some("v"), None, "hot", EventType::View, now));
    let mut warm = event(Some("u"), None, "warm", EventType::View, now);
    warm.categories = vec!["Drama".into(), "Comedy".into()];
    events.push(warm);
    events.push(event(Some("u"), None, "bought", EventType::Purchase, now));
    // Older than the 24-bucket window: ignored.
    events.push(event(
        Some("u"),
        None,
        "ancient",
        EventType::Purchase,
        now - 48 * HOUR_MS,
    ));
    h.store.append(&events).await.unwrap();

    let top = h.store.trending(None, 10).await.unwrap();
    let names: Vec<&str> = top.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(names, ["bought", "hot", "warm", "old"], "{top:?}");
    assert!(
        (top[0].1 - 8.0).abs() < 1e-6 && (top[3].1 - 10.0 / 32.0).abs() < 1e-6,
        "{top:?}"
    );

    let drama = h.store.trending(Some("Drama"), 10).await.unwrap();
    let names: Vec<&str> = drama.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(names, ["warm", "old"], "per-category trending");
    assert_eq!(
        h.store.trending(None, 2).await.unwrap().len(),
        2,
        "k is honoured"
    );
    assert!(h
        .store
        .trending(Some("Horror"), 10)
        .await
        .unwrap()
        .is_empty());
    h.cleanup().await;
}

/// A store with one-second trending buckets, a two-bucket window and a one-second half-life,
/// so that a bucket leaves the window within a test; returned 50 ms into a second, so that
/// the test's first steps start inside the bucket they mean.
async fn one_second_trending(backend: Backend) -> Harness {
    let h = Harness::new(backend, |s| {
        s.session.trending_half_life_secs = 1.0;
        s.session.trending_bucket_secs = 1;
        s.session.trending_buckets = 2;
    })
    .await;
    until_second(second_now() + 1).await;
    h
}

/// The one-second trending bucket the clock is in now.
fn second_now() -> i64 {
    now_ms().div_euclid(1_000)
}

/// Sleeps until 50 ms into second `s`: the bucket a step means, by the clock the stores bucket
/// by, rather than a fixed sleep after earlier steps, which drifts by however long they took.
async fn until_second(s: i64) {
    let wait = s * 1_000 + 50 - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// A step of a one-second-bucket scenario ran past the end of its bucket (a stalled box), so
/// its exact expectations do not apply.
#[derive(Debug)]
struct Crossed;

/// `Err(Crossed)` once the clock has left second `s`; checked after a step's reads and
/// before its asserts, so every read it checks was made inside `s`.
fn still_in(s: i64) -> Result<(), Crossed> {
    if second_now() == s {
        Ok(())
    } else {
        Err(Crossed)
    }
}

type Scenario = for<'a> fn(
    &'a Harness,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), Crossed>> + Send + 'a>,
>;

/// Runs a scenario whose steps each expect exact scores inside one one-second bucket, with
/// a fresh store each time, until one run has every step inside its bucket (at most five).
/// A failed expectation inside its bucket fails the test at once.
async fn in_one_second_buckets(backend: Backend, scenario: Scenario) {
    for attempt in 1..=5 {
        let h = one_second_trending(backend).await;
        let outcome = scenario(&h).await;
        h.cleanup().await;
        match outcome {
            Ok(()) => return,
            Err(Crossed) => eprintln!(
                "attempt {attempt}: a step ran past its one-second bucket (a busy box); again"
            ),
        }
    }
    panic!("five runs in a row had a step run past its one-second bucket");
}

async fn trending_forgets_buckets_that_leave_the_window(backend: Backend) {
    in_one_second_buckets(backend, |h| {
        Box::pin(forgets_buckets_that_leave_the_window(h))
    })
    .await
}

async fn forgets_buckets_that_leave_the_window(h: &Harness) -> Result<(), Crossed> {
    let scores = |top: Vec<(ItemId, f64)>| -> Vec<(String, f64)> {
        top.into_iter()
            .map(|(i, s)| (i.as_str().to_string(), s))
            .collect()
    };
    let close = |got: &[(String, f64)], want: &[(&str, f64)]| {
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| g.0 == w.0 && (g.1 - w.1).abs() < 1e-9)
    };
    let start = second_now();
    let now = now_ms();
    let mut events = vec![event(Some("u"), None, "old", EventType::View, now - 1_000)];
    for item in ["new", "new", "tie-c", "tie-a", "tie-b"] {
        events.push(event(Some("u"), None, item, EventType::View, now));
    }
    h.store.append(&events).await.unwrap();
    let top = scores(h.store.trending(None, 10).await.unwrap());
    let top2 = scores(h.store.trending(None, 2).await.unwrap());
    still_in(start)?;
    let want = [
        ("new", 2.0),
        ("tie-a", 1.0),
        ("tie-b", 1.0),
        ("tie-c", 1.0),
        ("old", 0.5),
    ];
    assert!(
        close(&top, &want),
        "last second's view counts half: {top:?}"
    );
    assert!(
        close(&top2, &[("new", 2.0), ("tie-a", 1.0)]),
        "ties at the cut go to the lowest id: {top2:?}"
    );

    // One second on, "old"'s bucket is out of the window and everything else is a second old.
    until_second(start + 1).await;
    let top = scores(h.store.trending(None, 10).await.unwrap());
    // A new view of "old" counts on its own: the expired one does not come back.
    let old = event(Some("u"), None, "old", EventType::View, now_ms());
    h.store.append(&[old]).await.unwrap();
    let top1 = scores(h.store.trending(None, 1).await.unwrap());
    let top_after = scores(h.store.trending(None, 10).await.unwrap());
    still_in(start + 1)?;
    let want = [("new", 1.0), ("tie-a", 0.5), ("tie-b", 0.5), ("tie-c", 0.5)];
    assert!(close(&top, &want), "the expired bucket is gone: {top:?}");
    assert!(close(&top1, &[("new", 1.0)]), "{top1:?}");
    assert!(
        top_after
            .iter()
            .any(|(i, s)| i == "old" && (s - 1.0).abs() < 1e-9),
        "one fresh view of old: {top_after:?}"
    );

    // Two seconds on, nothing is left, and counting starts again from nothing.
    until_second(start + 3).await;
    let empty = h.store.trending(None, 10).await.unwrap();
    let fresh = event(Some("u"), None, "fresh", EventType::View, now_ms());
    h.store.append(&[fresh]).await.unwrap();
    let top = scores(h.store.trending(None, 10).await.unwrap());
    still_in(start + 3)?;
    assert!(empty.is_empty(), "{empty:?}");
    assert!(close(&top, &[("fresh", 1.0)]), "{top:?}");
    Ok(())
}

/// A bucket of more items than Redis subtracts in one script call (2,000) still leaves the
/// sums entirely, over the next calls.
async fn trending_forgets_a_bucket_of_many_items(backend: Backend) {
    in_one_second_buckets(backend, |h| Box::pin(forgets_a_bucket_of_many_items(h))).await
}

async fn forgets_a_bucket_of_many_items(h: &Harness) -> Result<(), Crossed> {
    let start = second_now();
    let now = now_ms();
    let mut events: Vec<Event> = (0..2_500)
        .map(|i| {
            event(
                Some("u"),
                None,
                &format!("many-{i}"),
                EventType::View,
                now - 1_000,
            )
        })
        .collect();
    events.push(event(Some("u"), None, "fresh", EventType::View, now));
    h.store.append(&events).await.unwrap();
    let all = h.store.trending(None, 5_000).await.unwrap().len();
    still_in(start)?;
    assert_eq!(all, 2_501);

    until_second(start + 1).await;
    let mut top = Vec::new();
    for _ in 0..2 {
        top = h.store.trending(None, 5_000).await.unwrap();
    }
    still_in(start + 1)?;
    let names: Vec<&str> = top.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(
        names,
        ["fresh"],
        "the expired bucket is gone after two reads"
    );
    Ok(())
}

async fn export_round_trips_through_the_common_format(backend: Backend) {
    let h = Harness::new(backend, |_| {}).await;
    let t = 1_700_000_000_000;
    let mut rating = event(Some("u1"), Some("s1"), "i1", EventType::Rating, t);
    rating.value = Some(4.5);
    let events = vec![
        rating,
        event(Some("u1"), None, "i2", EventType::Purchase, t + 1000),
        event(None, Some("anon"), "i3", EventType::View, t + 2000),
        event(Some("u2"), None, "i4", EventType::Impression, t + 3000),
        event(Some("u2"), None, "i,5", EventType::AddToCart, t + 4999),
    ];
    h.store.append(&events).await.unwrap();
    let out = h._dir.path().join("export");
    let summary = session::export::export_events(&h.settings, &out, t + 1000)
        .await
        .unwrap();
    assert_eq!(summary.written, 3);
    assert_eq!(summary.skipped_zero_weight, 1, "the impression is left out");
    let rows = tandem::data::read_interactions(&out.join("interactions.csv")).unwrap();
    let got: Vec<(String, String, f32, i64, EventType)> = rows
        .iter()
        .map(|r| {
            (
                r.user_id.to_string(),
                r.item_id.to_string(),
                r.rating,
                r.timestamp,
                r.event_type,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "u1".into(),
                "i2".into(),
                8.0,
                1_700_000_001,
                EventType::Purchase
            ),
            (
                "session:anon".into(),
                "i3".into(),
                1.0,
                1_700_000_002,
                EventType::View
            ),
            (
                "u2".into(),
                "i,5".into(),
                4.0,
                1_700_000_004,
                EventType::AddToCart
            ),
        ]
    );
    let all = session::export::export_events(&h.settings, &out, i64::MIN)
        .await
        .unwrap();
    assert_eq!(all.written, 4);
    let rows = tandem::data::read_interactions(&out.join("interactions.csv")).unwrap();
    assert_eq!(
        (rows[0].rating, rows[0].event_type),
        (4.5, EventType::Rating),
        "a rating keeps its value"
    );
    h.cleanup().await;
}

async fn concurrent_appends_lose_nothing(backend: Backend) {
    let h = Harness::new(backend, |_| {}).await;
    let now = now_ms();
    let tasks: Vec<_> = (0..24)
        .map(|t| {
            let store = h.store.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for b in 0..8 {
                    let batch: Vec<Event> = (0..10)
                        .map(|i| {
                            event(
                                Some(&format!("u{t}")),
                                None,
                                &format!("i{b}-{i}"),
                                EventType::Click,
                                now,
                            )
                        })
                        .collect();
                    let out = store.append(&batch).await.unwrap();
                    assert_eq!(out.accepted, 10);
                    sent.extend(batch.iter().map(|e| e.event_id));
                }
                sent
            })
        })
        .collect();
    let mut sent = HashSet::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    let logged: Vec<uuid::Uuid> = h
        .store
        .read_log(0, i64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(logged.len(), 24 * 80, "no event lost or doubled");
    assert_eq!(logged.into_iter().collect::<HashSet<_>>(), sent);
    assert_eq!(
        h.store.recent(&user("u7"), 100).await.unwrap().len(),
        50,
        "capped at the default 50"
    );
    h.cleanup().await;
}

async fn cache_entries_expire(backend: Backend) {
    let h = Harness::new(backend, |_| {}).await;
    let key = "u1:model-3:filter-abc";
    let ttl = Duration::from_millis(1_500);
    assert_eq!(h.store.cache_get(key).await.unwrap(), None);
    h.store
        .cache_set("other", b"x", Duration::from_secs(60))
        .await
        .unwrap();
    for value in [&b"candidates-v1"[..], b"candidates-v2"] {
        let set = Instant::now();
        h.store.cache_set(key, value, ttl).await.unwrap();
        let got = h.store.cache_get(key).await.unwrap();
        // Exact only when read before the TTL could have run out (a stalled box may not).
        if set.elapsed() < ttl {
            assert_eq!(got.as_deref(), Some(value), "a set replaces the entry");
        }
    }
    eventually(
        "the entry expires after its TTL",
        Duration::from_secs(20),
        || async { h.store.cache_get(key).await.unwrap().is_none() },
    )
    .await;
    assert_eq!(
        h.store.cache_get("other").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    h.cleanup().await;
}

/// Experiment counts: concurrent batches from many tasks (replicas) add up exactly, and
/// hashes do not mix.
async fn counters_add_up_across_concurrent_writers(backend: Backend) {
    let h = Harness::new(backend, |_| {}).await;
    assert!(h.store.read_counters("exp:a").await.unwrap().is_empty());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                store
                    .incr_counters(
                        "exp:a",
                        &[("B:impressions".into(), 2), ("B:clicks".into(), 1)],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    h.store
        .incr_counters("exp:b", &[("B:clicks".into(), 5)])
        .await
        .unwrap();
    let a = h.store.read_counters("exp:a").await.unwrap();
    assert_eq!(a.get("B:impressions"), Some(&400));
    assert_eq!(a.get("B:clicks"), Some(&200));
    assert_eq!(a.len(), 2);
    let b = h.store.read_counters("exp:b").await.unwrap();
    assert_eq!(b.get("B:clicks"), Some(&5));
    h.cleanup().await;
}

async fn read_log_filters_by_time(backend: Backend) {
    let h = Harness::new(backend, |_| {}).await;
    let events: Vec<Event> = (0..5)
        .map(|i| {
            event(
                Some("u"),
                None,
                &format!("i{i}"),
                EventType::View,
                1_000 * (i + 1),
            )
        })
        .collect();
    h.store.append(&events).await.unwrap();
    let got = h.store.read_log(2_000, 4_000).await.unwrap();
    let items: Vec<&str> = got.iter().map(|e| e.item_id.as_str()).collect();
    assert_eq!(items, ["i1", "i2"], "from inclusive, to exclusive");
    assert_eq!(got[0], events[1], "events come back whole");
    h.cleanup().await;
}

// ---- memory backend: crash safety ----

const CRASH_CHILD_ENV: &str = "TANDEM_TEST_CRASH_CHILD_LOG";

fn memory_settings(log: &Path) -> tandem::config::SessionSettings {
    tandem::config::SessionSettings {
        log_path: log.to_path_buf(),
        ..Default::default()
    }
}

/// In the child: append batches forever, printing each event id once `append` returned.
async fn crash_child(log: PathBuf) {
    let store = MemoryStore::open(&memory_settings(&log), &log).unwrap();
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let batch: Vec<Event> = (0..5)
                        .map(|i| {
                            event(
                                Some(&format!("u{t}")),
                                None,
                                &format!("i{n}-{i}"),
                                EventType::Click,
                                now_ms(),
                            )
                        })
                        .collect();
                    store.append(&batch).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    for e in &batch {
                        writeln!(out, "ACK {}", e.event_id).unwrap();
                    }
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_log_keeps_every_acknowledged_event_across_sigkill() {
    if let Ok(log) = std::env::var(CRASH_CHILD_ENV) {
        crash_child(PathBuf::from(log)).await;
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.log");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "memory_log_keeps_every_acknowledged_event_across_sigkill",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = HashSet::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let take = |line: std::io::Result<String>, acked: &mut HashSet<uuid::Uuid>| {
        if let Some(id) = line.unwrap().strip_prefix("ACK ") {
            acked.insert(uuid::Uuid::parse_str(id).unwrap());
        }
    };
    while acked.len() < 400 {
        match lines.next() {
            Some(line) => take(line, &mut acked),
            None => break,
        }
    }
    // SIGKILL while the child is still writing: no destructor, no flush.
    child.kill().unwrap();
    child.wait().unwrap();
    // Lines already in the pipe were printed after their append returned: acknowledged too.
    for line in lines {
        take(line, &mut acked);
    }
    assert!(
        acked.len() >= 400,
        "the child acknowledged only {} events",
        acked.len()
    );

    // Whatever the kill left behind, add a torn record of our own: a header promising more
    // bytes than follow, as a crash in the middle of a write would.
    let intact_len = std::fs::metadata(&log).unwrap().len();
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"'])
        .unwrap();
    drop(f);

    let store = MemoryStore::open(&memory_settings(&log), &log).unwrap();
    assert!(
        std::fs::metadata(&log).unwrap().len() <= intact_len,
        "the torn record was truncated"
    );
    let logged: HashSet<uuid::Uuid> = store
        .read_log(0, i64::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    let missing = acked.difference(&logged).count();
    assert_eq!(missing, 0, "{missing} acknowledged events were lost");
    // The reopened log takes new writes after the truncation point.
    let e = event(Some("after"), None, "x", EventType::Click, now_ms());
    store.append(std::slice::from_ref(&e)).await.unwrap();
    drop(store);
    let store = MemoryStore::open(&memory_settings(&log), &log).unwrap();
    assert_eq!(
        ids(&store.recent(&user("after"), 5).await.unwrap()),
        ["x"],
        "state is rebuilt from the log"
    );
}

// ---- Redis backend: Redis going away and coming back ----

/// A three-node Redis Cluster (no replicas) on free ports, stopped on drop.
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    fn start(dir: &Path) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start(free_port(), dir, &["--cluster-enabled", "yes"]))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the test cluster did not become ready"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// The seed nodes, as `session.redis_url` takes them.
    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_quickly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::start(free_port(), dir.path(), &[]);
    let mut settings = Settings::default();
    settings.session.backend = SessionBackend::Redis;
    settings.session.redis_url = server.url();
    let store = RedisStore::connect(&settings.session).await.unwrap();
    let e = event(Some("u"), None, "i1", EventType::Click, now_ms());
    store.append(std::slice::from_ref(&e)).await.unwrap();
    assert_eq!(ids(&store.recent(&user("u"), 5).await.unwrap()), ["i1"]);

    // Hung: every call must give up within the budget instead of waiting for an answer.
    server.signal("-STOP");
    for (what, result, took) in down_calls(&store).await {
        assert!(
            matches!(result, Err(SessionError::Unavailable(_))),
            "{what} while Redis is hung gave {result:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{what} took {took:?} while Redis is hung"
        );
    }
    server.signal("-CONT");
    wait_until_up(&store).await;
    assert_eq!(ids(&store.recent(&user("u"), 5).await.unwrap()), ["i1"]);

    // Dead: connections are refused.
    server.kill();
    for round in 0..3 {
        for (what, result, took) in down_calls(&store).await {
            assert!(
                matches!(result, Err(SessionError::Unavailable(_))),
                "round {round}: {what} while Redis is down gave {result:?}"
            );
            assert!(
                took < Duration::from_secs(1),
                "round {round}: {what} took {took:?}"
            );
        }
    }

    server.restart();
    wait_until_up(&store).await;
    store
        .append(&[event(Some("u"), None, "i3", EventType::Click, now_ms())])
        .await
        .unwrap();
    // The restarted server is empty (no persistence), so only the new event is there.
    assert_eq!(ids(&store.recent(&user("u"), 5).await.unwrap()), ["i3"]);
}

#[tokio::test]
async fn redis_store_starts_while_redis_is_down() {
    let mut settings = Settings::default();
    settings.session.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let store = RedisStore::connect(&settings.session).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(
        store.ping().await,
        Err(SessionError::Unavailable(_))
    ));
}

/// One of each kind of call, with its result and how long it took.
async fn down_calls(store: &RedisStore) -> Vec<(&'static str, Result<(), SessionError>, Duration)> {
    let u = UserId::parse("u").unwrap();
    let e = event(Some("u"), None, "i2", EventType::Click, now_ms());
    vec![
        timed("append", store.append(std::slice::from_ref(&e))).await,
        timed("recent", store.recent(&user("u"), 5)).await,
        timed("history", store.history(&u, 5)).await,
        timed("trending", store.trending(None, 5)).await,
        timed("cache_get", store.cache_get("k")).await,
        timed(
            "cache_set",
            store.cache_set("k", b"v", Duration::from_secs(1)),
        )
        .await,
        timed("ping", store.ping()).await,
    ]
}

async fn wait_until_up(store: &RedisStore) {
    eventually(
        "the store recovers after Redis came back",
        Duration::from_secs(5),
        || async { store.ping().await.is_ok() },
    )
    .await;
}

async fn timed<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, SessionError>>,
) -> (&'static str, Result<(), SessionError>, Duration) {
    let start = Instant::now();
    let r = f.await.map(|_| ());
    (what, r, start.elapsed())
}

#[test]
fn session_settings_come_from_env_and_bad_ones_name_the_field() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let s = Settings::load_from(
        None,
        env(&[
            ("TANDEM_SESSION__EVENT_WEIGHTS__VIEW", "0.5"),
            ("TANDEM_SESSION__SESSION_RECENT_TTL_SECS", "60"),
            ("TANDEM_SESSION__MAX_BATCH", "10"),
        ]),
    )
    .unwrap();
    assert_eq!(s.session.event_weights.view, 0.5);
    assert_eq!(s.session.session_recent_ttl_secs, 60.0);
    let limits = session::EventLimits::from(&s.session);
    assert_eq!(limits.max_batch, 10);
    assert_eq!(limits.max_future_ms, 3_600_000);

    for (var, value, field) in [
        ("TANDEM_SESSION__RECENT_CAP", "0", "session.recent_cap"),
        (
            "TANDEM_SESSION__EVENT_WEIGHTS__CLICK",
            "-1",
            "session.event_weights.click",
        ),
        (
            "TANDEM_SESSION__TRENDING_HALF_LIFE_SECS",
            "0",
            "session.trending_half_life_secs",
        ),
    ] {
        let err = Settings::load_from(None, env(&[(var, value)])).unwrap_err();
        assert!(
            err.to_string().contains(&format!("`{field}`")),
            "{var}: {err}"
        );
    }
}

#[tokio::test]
async fn a_batch_from_the_wire_is_validated_with_the_configured_limit() {
    let json = r#"[
        {"user_id": "u1", "item_id": "i1", "type": "click", "timestamp": "2023-11-14T22:13:20Z"},
        {"session_id": "s1", "item_id": "i2", "type": "purchase", "value": 2, "event_id": "5f0c6f1e-8a53-4c7e-9f53-2b8f5b8f8d11"},
        {"user_id": "u1", "item_id": "i3", "type": "wishlist"}
    ]"#;
    let inputs: Vec<session::EventInput> = serde_json::from_str(json).unwrap();
    let limits = session::EventLimits::default();
    let err = session::validate_batch(inputs.clone(), now_ms(), &limits).unwrap_err();
    assert_eq!(err.field(), "events[2].type");
    assert!(err.to_string().contains("wishlist"), "{err}");

    let ok = session::validate_batch(inputs[..2].to_vec(), now_ms(), &limits).unwrap();
    assert_eq!(ok[0].timestamp_ms, 1_700_000_000_000);
    assert_eq!(
        ok[1].event_id.to_string(),
        "5f0c6f1e-8a53-4c7e-9f53-2b8f5b8f8d11"
    );
    assert_eq!(ok[1].value, Some(2.0));

    let small = session::EventLimits {
        max_batch: 1,
        ..limits
    };
    let err = session::validate_batch(inputs, now_ms(), &small).unwrap_err();
    assert!(matches!(
        err,
        session::EventError::BatchTooLarge { len: 3, max: 1, .. }
    ));
}
