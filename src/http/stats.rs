//! `GET /v1/stats`: the server's own live figures for the admin dashboard, from real
//! counters: request rate, latency percentiles and errors over the last minute, and the
//! candidate cache's hit rate. Prometheus (`/metrics`) is the place for long-term
//! monitoring; this is the quick look a person wants on a page without a metrics stack.

use crate::pipeline::Source;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The window is kept as this many slots of [`SLOT_SECS`], recycled in a ring, so old
/// requests age out without a timer task.
const SLOTS: u64 = 6;
const SLOT_SECS: u64 = 10;
/// Latencies are recorded in microseconds, up to a minute.
const MAX_MICROS: u64 = 60_000_000;
/// The admin page's charts: the last 15 minutes in points of [`SLOT_SECS`]. Their
/// histograms keep 2 significant digits (a 1% step, about 20 KB each) rather than 3.
const SERIES_SLOTS: u64 = 90;

/// Counters shared by the request middleware, the handlers that know about the cache, and
/// `GET /v1/stats`. One per server (tests start many in one process).
pub struct ServerStats {
    started: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    window: Mutex<Vec<Slot>>,
    series: Mutex<Vec<SeriesSlot>>,
}

struct SeriesSlot {
    epoch: u64,
    requests: u64,
    errors: u64,
    cache_hits: u64,
    cache_misses: u64,
    latency: Histogram<u64>,
}

impl SeriesSlot {
    /// The slot of `epoch`, emptied first if it held an older one.
    fn at(ring: &mut [SeriesSlot], epoch: u64) -> &mut SeriesSlot {
        let slot = &mut ring[(epoch % SERIES_SLOTS) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.requests = 0;
            slot.errors = 0;
            slot.cache_hits = 0;
            slot.cache_misses = 0;
            slot.latency.reset();
        }
        slot
    }
}

struct Slot {
    /// Which `SLOT_SECS` interval since start this slot holds.
    epoch: u64,
    requests: u64,
    errors: u64,
    latency: Histogram<u64>,
}

/// The JSON of `GET /v1/stats`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StatsSnapshot {
    pub uptime_s: f64,
    /// API requests (`/v1/*`) since start, and those answered with a 5xx.
    pub requests_total: u64,
    pub errors_total: u64,
    /// The seconds the `window` figures cover (less than a minute just after start).
    pub window_s: f64,
    pub window: WindowStats,
    pub cache: CacheStats,
    /// The last 15 minutes, oldest first, one point per 10 s (fewer just after start), for
    /// the admin page's charts.
    pub series: Vec<SeriesPoint>,
}

/// Ten seconds of serving.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SeriesPoint {
    /// How long ago the point's 10 s began, in seconds (the newest point is still filling).
    pub ago_s: f64,
    pub requests: u64,
    pub rps: f64,
    /// 5xx answers.
    pub errors: u64,
    /// Absent when the point holds no request.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Absent without a personalised request.
    pub cache_hit_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WindowStats {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    /// Latency percentiles in milliseconds, measured from request in to response out;
    /// absent when the window holds no request.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheStats {
    /// Personalised requests whose candidates came from the candidate cache, and those
    /// that had to search the index.
    pub hits: u64,
    pub misses: u64,
    /// hits / (hits + misses); absent before the first personalised request.
    pub hit_rate: Option<f64>,
}

impl Default for ServerStats {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerStats {
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Self {
        let slots = (0..SLOTS)
            .map(|_| Slot {
                epoch: u64::MAX,
                requests: 0,
                errors: 0,
                latency: new_histogram(),
            })
            .collect();
        ServerStats {
            started,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            window: Mutex::new(slots),
            series: Mutex::new(
                (0..SERIES_SLOTS)
                    .map(|_| SeriesSlot {
                        epoch: u64::MAX,
                        requests: 0,
                        errors: 0,
                        cache_hits: 0,
                        cache_misses: 0,
                        latency: Histogram::new_with_bounds(1, MAX_MICROS, 2)
                            .expect("valid histogram bounds"),
                    })
                    .collect(),
            ),
        }
    }

    /// One answered API request.
    pub fn record_request(&self, latency: Duration, server_error: bool) {
        self.record_at(Instant::now(), latency, server_error);
    }

    /// One personalised candidate fetch: from the cache (`hit`) or from the index.
    pub fn record_cache(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch(Instant::now());
        let mut series = self.series.lock();
        let slot = SeriesSlot::at(&mut series, epoch);
        if hit {
            slot.cache_hits += 1;
        } else {
            slot.cache_misses += 1;
        }
    }

    /// Counts a recommendation's candidate source: `cached` is a cache hit, `personal` a
    /// miss (an index search); trending and similar lists do not use the cache.
    pub fn record_source(&self, source: Source) {
        match source {
            Source::Cached => self.record_cache(true),
            Source::Personal => self.record_cache(false),
            Source::Trending | Source::Similar => {}
        }
    }

    fn record_at(&self, now: Instant, latency: Duration, server_error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if server_error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let epoch = self.epoch(now);
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        let mut window = self.window.lock();
        let slot = &mut window[(epoch % SLOTS) as usize];
        if slot.epoch != epoch {
            slot.epoch = epoch;
            slot.requests = 0;
            slot.errors = 0;
            slot.latency.reset();
        }
        slot.requests += 1;
        slot.errors += u64::from(server_error);
        // Clamped into the histogram's range above, so this cannot fail.
        let _ = slot.latency.record(micros);
        drop(window);
        let mut series = self.series.lock();
        let point = SeriesSlot::at(&mut series, epoch);
        point.requests += 1;
        point.errors += u64::from(server_error);
        let _ = point.latency.record(micros);
    }

    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / SLOT_SECS
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> StatsSnapshot {
        let uptime = now.saturating_duration_since(self.started).as_secs_f64();
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(SLOTS - 1);
        let mut merged = new_histogram();
        let (mut requests, mut errors) = (0, 0);
        for slot in self.window.lock().iter() {
            if slot.epoch != u64::MAX && slot.epoch >= oldest && slot.epoch <= epoch {
                requests += slot.requests;
                errors += slot.errors;
                // Same bounds on both sides, so adding cannot fail.
                let _ = merged.add(&slot.latency);
            }
        }
        let window_s = (uptime - (oldest * SLOT_SECS) as f64).max(1e-3);
        let pct = |q: f64| (requests > 0).then(|| merged.value_at_quantile(q) as f64 / 1000.0);
        let hits = self.cache_hits.load(Ordering::Relaxed);
        let misses = self.cache_misses.load(Ordering::Relaxed);
        StatsSnapshot {
            uptime_s: uptime,
            requests_total: self.requests.load(Ordering::Relaxed),
            errors_total: self.errors.load(Ordering::Relaxed),
            window_s,
            window: WindowStats {
                requests,
                errors,
                rps: requests as f64 / window_s,
                p50_ms: pct(0.50),
                p90_ms: pct(0.90),
                p99_ms: pct(0.99),
                max_ms: (requests > 0).then(|| merged.max() as f64 / 1000.0),
            },
            cache: CacheStats {
                hits,
                misses,
                hit_rate: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            },
            series: self.series_at(uptime, epoch),
        }
    }

    /// One point per slot from 15 minutes ago (or the start) to now; a slot no request
    /// touched is a point of zeros.
    fn series_at(&self, uptime: f64, epoch: u64) -> Vec<SeriesPoint> {
        let first = epoch.saturating_sub(SERIES_SLOTS - 1);
        let ring = self.series.lock();
        (first..=epoch)
            .map(|e| {
                let begin = (e * SLOT_SECS) as f64;
                // The newest slot is still filling: its rate is over the time it has had.
                let span = (uptime - begin).clamp(1e-3, SLOT_SECS as f64);
                let slot = &ring[(e % SERIES_SLOTS) as usize];
                let live = slot.epoch == e;
                let requests = if live { slot.requests } else { 0 };
                let pct = |q: f64| {
                    (live && requests > 0)
                        .then(|| slot.latency.value_at_quantile(q) as f64 / 1000.0)
                };
                let fetches = if live {
                    slot.cache_hits + slot.cache_misses
                } else {
                    0
                };
                SeriesPoint {
                    ago_s: (uptime - begin).max(0.0),
                    requests,
                    rps: requests as f64 / span,
                    errors: if live { slot.errors } else { 0 },
                    p50_ms: pct(0.50),
                    p99_ms: pct(0.99),
                    cache_hit_rate: (fetches > 0).then(|| slot.cache_hits as f64 / fetches as f64),
                }
            })
            .collect()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// `GET /v1/stats`, with its own state so that it merges into any router.
pub fn routes<S: Clone + Send + Sync + 'static>(stats: Arc<ServerStats>) -> Router<S> {
    Router::new()
        .route("/v1/stats", get(get_stats))
        .with_state(stats)
}

/// The server's live figures: request rate, latency and errors over the last minute, and the
/// candidate cache hit rate.
#[utoipa::path(get, path = "/v1/stats", tag = "ops",
    responses((status = 200, description = "Live figures", body = StatsSnapshot)))]
pub async fn get_stats(State(stats): State<Arc<ServerStats>>) -> Json<StatsSnapshot> {
    Json(stats.snapshot())
}

/// Middleware: times every `/v1/*` request except the stats endpoint itself (the dashboard
/// polls it, and counting the polls would only measure the dashboard).
pub async fn track(State(stats): State<Arc<ServerStats>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/v1/") || path == "/v1/stats" {
        return next.run(req).await;
    }
    let started = Instant::now();
    let res = next.run(req).await;
    stats.record_request(started.elapsed(), res.status().is_server_error());
    res.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_and_rate_come_from_the_recorded_requests() {
        let t0 = Instant::now();
        let s = ServerStats::starting_at(t0);
        // 99 fast requests and one slow one, over 20 s.
        for i in 0..100u64 {
            let lat = if i == 99 { ms(250) } else { ms(2) };
            s.record_at(t0 + Duration::from_millis(i * 200), lat, i == 50);
        }
        let snap = s.snapshot_at(t0 + Duration::from_secs(20));
        assert_eq!(snap.requests_total, 100);
        assert_eq!(snap.errors_total, 1);
        assert_eq!(snap.window.requests, 100);
        assert_eq!(snap.window.errors, 1);
        assert!((snap.window.rps - 5.0).abs() < 0.01, "{}", snap.window.rps);
        let p50 = snap.window.p50_ms.unwrap();
        assert!((1.9..2.1).contains(&p50), "p50 {p50}");
        let max = snap.window.max_ms.unwrap();
        assert!((249.0..251.0).contains(&max), "max {max}");
    }

    #[test]
    fn requests_older_than_the_window_age_out_but_totals_stay() {
        let t0 = Instant::now();
        let s = ServerStats::starting_at(t0);
        s.record_at(t0 + Duration::from_secs(1), ms(100), true);
        s.record_at(t0 + Duration::from_secs(75), ms(3), false);
        let snap = s.snapshot_at(t0 + Duration::from_secs(80));
        assert_eq!(snap.requests_total, 2);
        assert_eq!(snap.errors_total, 1);
        assert_eq!(
            snap.window.requests, 1,
            "the request at 1 s is older than a minute"
        );
        assert_eq!(snap.window.errors, 0);
        assert!(snap.window.max_ms.unwrap() < 4.0);
        assert!((50.0..=60.0).contains(&snap.window_s), "{}", snap.window_s);
    }

    #[test]
    fn the_series_keeps_fifteen_minutes_in_ten_second_points() {
        let t0 = Instant::now();
        let s = ServerStats::starting_at(t0);
        // A burst of errors 2 minutes in, and slow requests 14 minutes in.
        for i in 0..20 {
            s.record_at(t0 + Duration::from_secs(125) + ms(i * 100), ms(1), true);
        }
        for _ in 0..10 {
            s.record_at(t0 + Duration::from_secs(845), ms(40), false);
        }
        let snap = s.snapshot_at(t0 + Duration::from_secs(16 * 60));
        assert_eq!(snap.series.len(), 90, "15 minutes of 10 s points");
        let at = |ago: f64| {
            snap.series
                .iter()
                .find(|p| (p.ago_s - ago).abs() < 0.5)
                .unwrap_or_else(|| panic!("no point {ago} s ago"))
        };
        let burst = at(960.0 - 120.0);
        assert_eq!((burst.requests, burst.errors), (20, 20));
        assert!((burst.rps - 2.0).abs() < 1e-9, "{}", burst.rps);
        let slow = at(960.0 - 840.0);
        let p99 = slow.p99_ms.unwrap();
        assert!((39.0..41.0).contains(&p99), "{p99}");
        assert!(at(10.0).p50_ms.is_none(), "a quiet point has no latency");
        assert!(
            snap.series.windows(2).all(|w| w[0].ago_s > w[1].ago_s),
            "oldest first"
        );
    }

    #[test]
    fn an_empty_window_reports_no_percentiles_and_no_hit_rate() {
        let s = ServerStats::new();
        let snap = s.snapshot();
        assert_eq!(snap.window.requests, 0);
        assert!(snap.window.p99_ms.is_none());
        assert!(snap.cache.hit_rate.is_none());
    }

    #[test]
    fn cache_hit_rate_counts_hits_over_all_fetches() {
        let s = ServerStats::new();
        for hit in [true, true, true, false] {
            s.record_cache(hit);
        }
        let c = s.snapshot().cache;
        assert_eq!((c.hits, c.misses), (3, 1));
        assert_eq!(c.hit_rate, Some(0.75));
    }

    #[tokio::test]
    async fn the_middleware_times_api_requests_but_not_pages_or_its_own_polls() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;
        let stats = Arc::new(ServerStats::new());
        let app: Router = Router::new()
            .route("/v1/ping", get(|| async { "pong" }))
            .route("/", get(|| async { "page" }))
            .merge(routes(stats.clone()))
            .layer(axum::middleware::from_fn_with_state(stats.clone(), track));
        for path in ["/v1/ping", "/v1/ping", "/", "/v1/stats"] {
            let res = app
                .clone()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert!(res.status().is_success(), "{path}");
        }
        let res = app
            .oneshot(Request::get("/v1/stats").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["requests_total"], 2, "{json}");
        assert_eq!(json["window"]["requests"], 2);
        assert!(json["window"]["p99_ms"].as_f64().is_some());
    }
}
