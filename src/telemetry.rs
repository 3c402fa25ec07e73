//! Observability: the log subscriber, the Prometheus recorder behind `/metrics`, and the one
//! vocabulary of metric names every layer records into. Recording goes through the functions
//! here (never raw metric names elsewhere) so that a dashboard can rely on the names and
//! labels listed below, and a renamed metric is a one-line change.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tandem_http_requests_total` | counter | `route`, `method`, `status` |
//! | `tandem_http_request_duration_seconds` | histogram | `route`, `method`, `status` |
//! | `tandem_http_rejected_total` | counter | `reason` (`overload`, `timeout`, `body_too_large`) |
//! | `tandem_stage_seconds` | histogram | `stage` (`read_session`, `user_vector`, `fetch_candidates`, `rerank`, ..) |
//! | `tandem_pipeline_seconds` | histogram | `kind` (`recommend`, `similar`, `trending`, ..) |
//! | `tandem_candidate_cache_total` | counter | `result` (`hit`, `miss`) |
//! | `tandem_events_total` | counter | `outcome` (`accepted`, `duplicate`, `rejected`, `unavailable`) |
//! | `tandem_model_active` | gauge | `version` (1 for the live model, 0 for the ones before) |
//! | `tandem_degraded_total` | counter | `cause` (`session`, `index`, `cache`, `trending`, `model`) |
//! | `tandem_dependency_up` | gauge | `dependency` (`session`, `index`): 0 while its breaker is open |
//! | `tandem_runtime_lag_seconds` | histogram | none: how late a 10 ms timer on the async runtime fired |
//! | `tandem_retrain_runs_total` | counter | `decision` (`promoted`, `held_back`, `failed`) |
//! | `tandem_retrain_stage_seconds` | gauge | `stage` (`gather`, `split`, `train`, `gate`, `promote`): the last run's |
//! | `tandem_retrain_gate` | gauge | `model` (`candidate`, `active`), `metric`: the last gate's scores |
//! | `tandem_retrain_last_run_timestamp_seconds` | gauge | none: when the last run finished |
//!
//! Per-variant experiment counters (`tandem_experiment_{impressions,clicks,purchases}_total`,
//! `tandem_experiment_latency_seconds`) are recorded by `experiment::export_metrics` into the
//! same recorder.
//!
//! Without an installed recorder (unit tests, CLI commands) every call is a cheap no-op.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

pub const HTTP_REQUESTS: &str = "tandem_http_requests_total";
pub const HTTP_DURATION: &str = "tandem_http_request_duration_seconds";
pub const HTTP_REJECTED: &str = "tandem_http_rejected_total";
pub const STAGE_SECONDS: &str = "tandem_stage_seconds";
pub const PIPELINE_SECONDS: &str = "tandem_pipeline_seconds";
pub const CANDIDATE_CACHE: &str = "tandem_candidate_cache_total";
pub const EVENTS: &str = "tandem_events_total";
pub const MODEL_ACTIVE: &str = "tandem_model_active";
pub const DEGRADED: &str = "tandem_degraded_total";
pub const DEPENDENCY_UP: &str = "tandem_dependency_up";
pub const RUNTIME_LAG: &str = "tandem_runtime_lag_seconds";
/// 1 when the start-up found `registry.json` damaged and fell back (see `Registry::open`).
pub const REGISTRY_RECOVERED: &str = "tandem_registry_recovered";
pub const RETRAIN_RUNS: &str = "tandem_retrain_runs_total";
pub const RETRAIN_STAGE_SECONDS: &str = "tandem_retrain_stage_seconds";
pub const RETRAIN_GATE: &str = "tandem_retrain_gate";
pub const RETRAIN_LAST_RUN: &str = "tandem_retrain_last_run_timestamp_seconds";

/// A timer firing this much late is logged: every request on the runtime waited as long.
const LAG_WARN: Duration = Duration::from_millis(50);

/// Latency buckets in seconds: fine below 5 ms where the serving targets sit, coarse up to the
/// request timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process (tests start many servers in one
/// process; the second install would fail) and starts its upkeep thread. Returns the handle
/// `/metrics` renders from, or `None` if another recorder was installed first.
pub fn install_metrics() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("latency buckets are non-empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    // Histograms buffer samples until upkeep drains them; without it memory
                    // grows with traffic between scrapes.
                    let upkeep = handle.clone();
                    let spawned = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "metrics upkeep thread not started");
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The Prometheus text exposition of every metric recorded so far (empty without a recorder).
pub fn render() -> String {
    RECORDER
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// Watches the async runtime for stalls, for as long as the runtime runs: a task asks to
/// wake every 10 ms and records how late it woke. A late wake-up means the worker threads
/// were busy or blocked (a long synchronous step, a lock, the allocator, the box's CPU), and
/// every request queued behind them waited as long; stalls past 50 ms are logged with their
/// time, so they can be lined up with what the service was doing.
pub fn spawn_lag_monitor() -> tokio::task::JoinHandle<()> {
    const TICK: Duration = Duration::from_millis(10);
    tokio::spawn(async {
        loop {
            let asked = std::time::Instant::now();
            tokio::time::sleep(TICK).await;
            let lag = asked.elapsed().saturating_sub(TICK);
            metrics::histogram!(RUNTIME_LAG).record(lag.as_secs_f64());
            if lag >= LAG_WARN {
                tracing::warn!(lag_ms = lag.as_millis() as u64, "the async runtime stalled");
            }
        }
    })
}

/// One HTTP request, by its route template (`/v1/items/{item_id}`, never the raw path, so
/// that item ids do not explode the label space).
pub fn record_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("route", route.to_string()),
        ("method", method.to_string()),
        ("status", status.to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(elapsed.as_secs_f64());
}

/// Why a request was turned away before its handler ran or finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Overload,
    Timeout,
    BodyTooLarge,
    /// The body did not arrive within `server.body_timeout_ms`.
    BodyTimeout,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Overload => "overload",
            Rejection::Timeout => "timeout",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BodyTimeout => "body_timeout",
        }
    }
}

pub fn record_rejection(why: Rejection) {
    metrics::counter!(HTTP_REJECTED, "reason" => why.as_str()).increment(1);
}

/// The duration of one pipeline stage.
pub fn record_stage(stage: &'static str, elapsed: Duration) {
    metrics::histogram!(STAGE_SECONDS, "stage" => stage).record(elapsed.as_secs_f64());
}

/// The whole pipeline of one request, by kind.
pub fn record_pipeline(kind: &'static str, elapsed: Duration) {
    metrics::histogram!(PIPELINE_SECONDS, "kind" => kind).record(elapsed.as_secs_f64());
}

pub fn record_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!(CANDIDATE_CACHE, "result" => result).increment(1);
}

/// Events taken in by `POST /v1/events`: new ones and resent duplicates.
pub fn record_events(accepted: usize, duplicates: usize) {
    metrics::counter!(EVENTS, "outcome" => "accepted").increment(accepted as u64);
    metrics::counter!(EVENTS, "outcome" => "duplicate").increment(duplicates as u64);
}

/// Events refused: `rejected` for invalid input, `unavailable` when the store could not make
/// them durable (the client was told to retry).
pub fn record_events_refused(unavailable: bool, count: usize) {
    let outcome = if unavailable {
        "unavailable"
    } else {
        "rejected"
    };
    metrics::counter!(EVENTS, "outcome" => outcome).increment(count as u64);
}

static ACTIVE_MODEL: Mutex<Option<String>> = Mutex::new(None);

/// Marks `version` as the live model: its gauge goes to 1 and the previous one's to 0, so
/// that a dashboard sees the switch and `max by (version)` names the live one.
pub fn set_model_version(version: &str) {
    let mut active = ACTIVE_MODEL.lock();
    if let Some(previous) = active.as_deref() {
        if previous != version {
            metrics::gauge!(MODEL_ACTIVE, "version" => previous.to_string()).set(0.0);
        }
    }
    metrics::gauge!(MODEL_ACTIVE, "version" => version.to_string()).set(1.0);
    *active = Some(version.to_string());
}

/// A finished retrain run: its decision, the time of each stage and both models' gate
/// metrics (gauges, so a dashboard charts them across runs).
pub fn record_retrain(report: &crate::retrain::report::RetrainReport) {
    let decision = match report.decision {
        crate::retrain::report::Decision::Promoted => "promoted",
        crate::retrain::report::Decision::HeldBack => "held_back",
        crate::retrain::report::Decision::Failed => "failed",
    };
    metrics::counter!(RETRAIN_RUNS, "decision" => decision).increment(1);
    for s in &report.stages {
        metrics::gauge!(RETRAIN_STAGE_SECONDS, "stage" => s.stage.clone()).set(s.seconds);
    }
    for (model, values) in [
        ("candidate", &report.candidate_metrics),
        ("active", &report.active_metrics),
    ] {
        for metric in crate::config::retrain::GATE_METRICS {
            if let Some(v) = values.get(metric) {
                metrics::gauge!(RETRAIN_GATE, "model" => model, "metric" => metric).set(*v);
            }
        }
    }
    metrics::gauge!(RETRAIN_LAST_RUN).set(chrono::Utc::now().timestamp() as f64);
}

/// A response served with a shortcut; `cause` is the name that appears in `degraded:[..]`.
pub fn record_degraded(cause: &str) {
    metrics::counter!(DEGRADED, "cause" => cause.to_string()).increment(1);
}

/// Whether the model registry was read from its fallback at start-up.
pub fn set_registry_recovered(recovered: bool) {
    metrics::gauge!(REGISTRY_RECOVERED).set(if recovered { 1.0 } else { 0.0 });
}

/// Whether a dependency currently answers (its breaker is closed).
pub fn set_dependency_up(dependency: &'static str, up: bool) {
    metrics::gauge!(DEPENDENCY_UP, "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
}

/// The process's resident memory in kB, anonymous and file-backed (`RssAnon`, `RssFile` of
/// `/proc/self/status`); zeros where there is no procfs.
pub fn resident_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// CPU seconds (user + system) this process has used so far, all threads; 0 where
/// `/proc/self/stat` cannot be read. On a shared box a stage's wall time depends on what else
/// runs; its CPU time much less.
pub fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces, so split after its ')'):
    // utime and stime are the 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

/// Logs the end of one start-up stage: its wall time, the process's CPU seconds so far and
/// the resident memory after it, so that a slow or large start can be read off the log stage
/// by stage (issue 37).
pub fn startup_stage(stage: &'static str, started: std::time::Instant) {
    let (anon, file) = resident_kb();
    tracing::info!(
        stage,
        secs = started.elapsed().as_secs_f64(),
        process_cpu_secs = process_cpu_secs(),
        rss_anon_mb = anon / 1024,
        rss_file_mb = file / 1024,
        "start-up stage done"
    );
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise; JSON lines when
/// `TANDEM_LOG_FORMAT=json`. Span fields (the request span carries `request_id`) appear on
/// every line logged inside the span, in both formats.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // qdrant-edge warns "Feature flags not initialized!" on every operation; it means
        // nothing to a tandem user.
        .add_directive(
            "qdrant_edge::common::flags=error"
                .parse()
                .expect("valid directive"),
        )
        // Every start warned that MULTI_MMAP_SUPPORT_CHECK_RESULT was never set: the Qdrant
        // server sets it after a file-system check at start-up, and qdrant-edge keeps both
        // the flag and the check private, so an embedded user cannot. Unset means "supported",
        // as it is on the file systems tandem runs on.
        .add_directive(
            "qdrant_edge::common::mmap::ops=error"
                .parse()
                .expect("valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        ))
        .with_writer(std::io::stderr);
    let json = std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // A second init (tests, or a library user with its own subscriber) only fails to install.
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// ANSI colours only on a terminal, and never when `NO_COLOR` is set (no-color.org): a log
/// redirected to a file reads as plain text.
fn colour_logs(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's CPU seconds grow with work done (the start-up stage log reports them).
    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_grow_with_work() {
        let before = process_cpu_secs();
        // Spin until the CPU time moves (a loaded box may give this thread little of it).
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_secs() - before < 0.05 {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "CPU time stuck at {before}"
            );
        }
    }

    /// One test owns the global recorder, so the assertions cannot race another test's install.
    #[test]
    fn the_exposition_carries_every_family_with_its_labels() {
        install_metrics().expect("first install in this test binary");
        record_request(
            "/v1/items/{item_id}",
            "GET",
            404,
            Duration::from_micros(800),
        );
        record_rejection(Rejection::Overload);
        record_stage("rerank", Duration::from_micros(300));
        record_cache(true);
        record_cache(false);
        record_events(3, 1);
        record_events_refused(true, 2);
        set_model_version("m-1");
        set_model_version("m-2");
        record_degraded("session");
        set_dependency_up("session", false);

        let text = render();
        for line in [
            r#"tandem_http_requests_total{route="/v1/items/{item_id}",method="GET",status="404"} 1"#,
            r#"tandem_http_rejected_total{reason="overload"} 1"#,
            r#"tandem_candidate_cache_total{result="hit"} 1"#,
            r#"tandem_candidate_cache_total{result="miss"} 1"#,
            r#"tandem_events_total{outcome="accepted"} 3"#,
            r#"tandem_events_total{outcome="duplicate"} 1"#,
            r#"tandem_events_total{outcome="unavailable"} 2"#,
            r#"tandem_model_active{version="m-1"} 0"#,
            r#"tandem_model_active{version="m-2"} 1"#,
            r#"tandem_degraded_total{cause="session"} 1"#,
            r#"tandem_dependency_up{dependency="session"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
        // Histograms are real buckets (so that p99 can be computed across replicas), with a
        // bucket at the 5 ms serving target.
        assert!(
            text.contains(r#"tandem_stage_seconds_bucket{stage="rerank",le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tandem_http_request_duration_seconds_bucket{route="/v1/items/{item_id}",method="GET",status="404",le="0.001"} 1"#),
            "{text}"
        );
    }
}
