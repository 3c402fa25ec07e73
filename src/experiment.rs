//! Running A/B experiments: attribution of events, and the per-variant report with Wilson
//! confidence intervals and p99 latency. The definitions, their validation and the
//! assignment are settings (`config::experiments`).
//!
//! Counts are kept in-process for at most a second and then added to the `SessionStore`
//! (`incr_counters`), so they add up across replicas with Redis and work alike with the
//! memory store. The Prometheus calls all live in [`export_metrics`].

use crate::config::experiments::{Assignment, Experiment, Unit};
use crate::config::RerankSettings;
use crate::domain::{EventType, SessionId, UserId};
use crate::session::{Event, SessionError, SessionStore};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a `request_id` can still attribute a later event to its variant.
const REQUEST_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// Latency histogram buckets grow by 10%, so p99 is exact to within 10%.
const LATENCY_GROWTH: f64 = 1.1;

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("no experiment named {0:?}")]
    Unknown(String),
    #[error(transparent)]
    Store(#[from] SessionError),
}

/// The outcome counters of one variant, accumulated between flushes.
#[derive(Default)]
struct Pending {
    /// Experiment name -> counter field -> delta.
    deltas: HashMap<String, HashMap<String, i64>>,
}

/// The running experiments: assignment, the variants' re-rank weights, counting, reports.
/// Cheap to share behind an `Arc`.
pub struct Experiments {
    current: ArcSwap<Vec<Experiment>>,
    store: Arc<dyn SessionStore>,
    pending: Mutex<Pending>,
    /// `[rerank.*]` from config, and what the re-ranker reads: those plus each variant's own
    /// weights.
    base_rerank: RerankSettings,
    rerank: ArcSwap<RerankSettings>,
}

impl Experiments {
    /// Starts with the configured set (already validated with the settings) and the
    /// configured re-rank weights.
    pub fn new(
        initial: Vec<Experiment>,
        store: Arc<dyn SessionStore>,
        base_rerank: RerankSettings,
    ) -> Self {
        let rerank = ArcSwap::from_pointee(merged_weights(&base_rerank, &initial));
        Experiments {
            current: ArcSwap::from_pointee(initial),
            store,
            pending: Mutex::new(Pending::default()),
            base_rerank,
            rerank,
        }
    }

    /// The per-variant re-rank weights now: `[rerank.*]` with the enabled experiment's
    /// variant weights on top. A request reads them once.
    pub fn weights(&self) -> Arc<RerankSettings> {
        self.rerank.load_full()
    }

    pub fn list(&self) -> Vec<Experiment> {
        self.current.load().as_ref().clone()
    }

    /// Replaces the whole set, which the caller has validated (`config::experiments::
    /// validate`: the settings at start-up, the admin API at run time). Counters of
    /// experiments that keep their name are kept.
    pub fn replace(&self, experiments: Vec<Experiment>) {
        self.rerank
            .store(Arc::new(merged_weights(&self.base_rerank, &experiments)));
        self.current.store(Arc::new(experiments));
    }

    /// Makes `experiments` (already validated) the running set everywhere: every replica
    /// first (they apply it within a second), then this one, its models pinned first so that
    /// the first request assigned to a new arm finds it serving. The admin API's `PUT` and the
    /// retrain loop's `promote = "experiment"` both come here.
    pub async fn apply(
        &self,
        experiments: Vec<Experiment>,
        bus: Option<&crate::cluster::Bus>,
        lifecycle: &crate::lifecycle::Lifecycle,
    ) -> Result<(), crate::cluster::ClusterError> {
        if let Some(bus) = bus {
            bus.set_experiments(&experiments).await?;
        }
        lifecycle
            .pin(crate::config::experiments::pinned_models(&experiments))
            .await;
        self.replace(experiments);
        Ok(())
    }

    /// The assignment of a request, or `None` when no experiment runs or the request has no
    /// id to hash (it then gets control).
    pub fn assign(&self, user: Option<&UserId>, session: Option<&SessionId>) -> Option<Assignment> {
        crate::config::experiments::assign(&self.current.load(), user, session)
    }

    /// Counts one served response (an impression) and its latency, and remembers its
    /// `request_id` so that later events citing it are attributed. Never blocks on the store.
    pub fn record_served(&self, a: &Assignment, request_id: &str, latency: Duration) {
        let micros = latency.as_micros().max(1) as f64;
        let bucket = micros.ln() / LATENCY_GROWTH.ln();
        let bucket = bucket.ceil().max(0.0) as u32;
        {
            let mut p = self.pending.lock();
            let d = p.deltas.entry(a.experiment.to_string()).or_default();
            *d.entry(field(&a.variant, "impressions")).or_insert(0) += 1;
            *d.entry(format!("{}:lat:{bucket}", a.variant)).or_insert(0) += 1;
        }
        export_metrics(
            &a.experiment,
            &a.variant,
            Outcome::Impression,
            Some(latency),
        );
        let store = self.store.clone();
        let key = request_key(request_id);
        let value = format!("{}\n{}", a.experiment, a.variant);
        tokio::spawn(async move {
            if let Err(e) = store
                .cache_set(&key, value.as_bytes(), REQUEST_MEMORY)
                .await
            {
                tracing::debug!(error = %e, "could not remember the request's variant");
            }
        });
    }

    /// Attributes clicks and purchases to the variant the server assigned: derived again
    /// from the event's user or session (as for the response it follows), or else the one
    /// the server recorded for the `request_id` in its `context`. The event's own `variant`
    /// is the client's word and never decides: one that disagrees is ignored and counted
    /// (`tandem_experiment_variant_mismatch_total`), so a client cannot move outcomes
    /// between arms.
    pub async fn attribute(&self, events: &[Event]) {
        for ev in events {
            let outcome = match ev.event_type {
                EventType::Click => Outcome::Click,
                EventType::Purchase => Outcome::Purchase,
                _ => continue,
            };
            let target = match self.assign(ev.user_id.as_ref(), ev.session_id.as_ref()) {
                Some(a) => Some((a.experiment.to_string(), a.variant)),
                None => self.variant_of_request(ev).await,
            };
            let Some((experiment, variant)) = target else {
                continue;
            };
            if let Some(claimed) = ev.variant.as_deref().filter(|c| *c != variant) {
                tracing::debug!(
                    experiment,
                    claimed,
                    assigned = variant,
                    "an event's variant disagrees with the server's assignment; ignored"
                );
                metrics::counter!("tandem_experiment_variant_mismatch_total", "experiment" => experiment.clone())
                    .increment(1);
            }
            {
                let mut p = self.pending.lock();
                let d = p.deltas.entry(experiment.clone()).or_default();
                *d.entry(field(&variant, outcome.field())).or_insert(0) += 1;
            }
            export_metrics(&experiment, &variant, outcome, None);
        }
    }

    async fn variant_of_request(&self, ev: &Event) -> Option<(String, String)> {
        let id = ev.context.as_ref()?.get("request_id")?.as_str()?;
        let bytes = self.store.cache_get(&request_key(id)).await.ok()??;
        let text = String::from_utf8(bytes).ok()?;
        let (e, v) = text.split_once('\n')?;
        Some((e.to_string(), v.to_string()))
    }

    /// Adds the pending counts to the store. On failure they are kept for the next flush.
    pub async fn flush(&self) -> Result<(), SessionError> {
        let taken = std::mem::take(&mut self.pending.lock().deltas);
        let mut failed: Option<SessionError> = None;
        let mut unsent = HashMap::new();
        for (experiment, fields) in taken {
            let deltas: Vec<(String, i64)> = fields.iter().map(|(k, v)| (k.clone(), *v)).collect();
            if failed.is_none() {
                match self
                    .store
                    .incr_counters(&counter_key(&experiment), &deltas)
                    .await
                {
                    Ok(()) => continue,
                    Err(e) => failed = Some(e),
                }
            }
            unsent.insert(experiment, fields);
        }
        if !unsent.is_empty() {
            let mut p = self.pending.lock();
            for (experiment, fields) in unsent {
                let d = p.deltas.entry(experiment).or_default();
                for (k, v) in fields {
                    *d.entry(k).or_insert(0) += v;
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Flushes every second until the task is dropped with the runtime.
    pub fn spawn_flusher(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { break };
                if let Err(e) = me.flush().await {
                    tracing::warn!(error = %e, "experiment counters not flushed; will retry");
                }
            }
        });
    }

    /// The report of one experiment, from the store's counters (pending ones flushed first).
    pub async fn report(&self, name: &str) -> Result<ExperimentReport, ExperimentError> {
        let e = self
            .current
            .load()
            .iter()
            .find(|e| e.name == name)
            .cloned()
            .ok_or_else(|| ExperimentError::Unknown(name.to_string()))?;
        self.flush().await?;
        let counters = self.store.read_counters(&counter_key(name)).await?;
        Ok(build_report(&e, &counters))
    }
}

/// The configured weights, with each enabled experiment's variant weights on top (a variant
/// without its own weights keeps `[rerank.<name>]`, or control's).
fn merged_weights(base: &RerankSettings, experiments: &[Experiment]) -> RerankSettings {
    let mut out = base.clone();
    for e in experiments.iter().filter(|e| e.enabled) {
        for v in &e.variants {
            if let Some(w) = &v.rerank {
                out.0.insert(v.name.clone(), w.clone());
            }
        }
    }
    out
}

fn field(variant: &str, what: &str) -> String {
    format!("{variant}:{what}")
}

fn counter_key(experiment: &str) -> String {
    format!("experiment:{experiment}")
}

fn request_key(request_id: &str) -> String {
    format!("experiment-request:{request_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Impression,
    Click,
    Purchase,
}

impl Outcome {
    fn field(self) -> &'static str {
        match self {
            Outcome::Impression => "impressions",
            Outcome::Click => "clicks",
            Outcome::Purchase => "purchases",
        }
    }
}

/// The one place experiment numbers become Prometheus metrics (a no-op until a recorder is
/// installed, e.g. by the `/metrics` endpoint).
pub fn export_metrics(
    experiment: &str,
    variant: &str,
    outcome: Outcome,
    latency: Option<Duration>,
) {
    let labels = [
        ("experiment", experiment.to_string()),
        ("variant", variant.to_string()),
    ];
    let name = match outcome {
        Outcome::Impression => "tandem_experiment_impressions_total",
        Outcome::Click => "tandem_experiment_clicks_total",
        Outcome::Purchase => "tandem_experiment_purchases_total",
    };
    metrics::counter!(name, &labels).increment(1);
    if let Some(l) = latency {
        metrics::histogram!("tandem_experiment_latency_seconds", &labels).record(l.as_secs_f64());
    }
}

/// A rate with its 95% Wilson score interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rate {
    /// successes / trials (`null` with no trials).
    pub value: Option<f64>,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// The Wilson score interval at 95%: unlike the normal approximation it stays inside [0, 1]
/// and behaves with few trials or rates near 0, which is where A/B tests start.
pub fn wilson(successes: u64, trials: u64) -> Rate {
    if trials == 0 {
        return Rate {
            value: None,
            ci_low: 0.0,
            ci_high: 1.0,
        };
    }
    let z = 1.959_963_984_540_054_f64;
    let n = trials as f64;
    // More clicks than impressions (several clicks on one list) would leave [0, 1].
    let p = (successes.min(trials) as f64) / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Rate {
        value: Some(successes as f64 / n),
        // Exactly 0 at p = 0 (the formula leaves a rounding residue).
        ci_low: if successes == 0 {
            0.0
        } else {
            (center - half).max(0.0)
        },
        ci_high: (center + half).min(1.0),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VariantReport {
    pub name: String,
    pub share: f64,
    pub model_version: Option<String>,
    /// Responses served in this arm.
    pub impressions: u64,
    pub clicks: u64,
    pub purchases: u64,
    /// Clicks per impression.
    pub ctr: Rate,
    /// Purchases per impression.
    pub conversion: Rate,
    /// Server-side p99 latency of this arm's responses (to within 10%), `null` before any.
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExperimentReport {
    pub name: String,
    pub enabled: bool,
    pub unit: Unit,
    pub variants: Vec<VariantReport>,
}

fn build_report(e: &Experiment, counters: &HashMap<String, i64>) -> ExperimentReport {
    let get = |k: String| counters.get(&k).copied().unwrap_or(0).max(0) as u64;
    let variants = e
        .variants
        .iter()
        .map(|v| {
            let impressions = get(field(&v.name, "impressions"));
            let clicks = get(field(&v.name, "clicks"));
            let purchases = get(field(&v.name, "purchases"));
            let prefix = format!("{}:lat:", v.name);
            let mut buckets: Vec<(u32, u64)> = counters
                .iter()
                .filter_map(|(k, n)| {
                    let b = k.strip_prefix(&prefix)?.parse().ok()?;
                    Some((b, (*n).max(0) as u64))
                })
                .collect();
            buckets.sort_unstable();
            VariantReport {
                name: v.name.clone(),
                share: v.share,
                model_version: v.model_version.clone(),
                impressions,
                clicks,
                purchases,
                ctr: wilson(clicks, impressions),
                conversion: wilson(purchases, impressions),
                p99_ms: quantile_ms(&buckets, 0.99),
            }
        })
        .collect();
    ExperimentReport {
        name: e.name.clone(),
        enabled: e.enabled,
        unit: e.unit,
        variants,
    }
}

/// The upper bound of the bucket holding quantile `q` of a log-bucketed histogram.
fn quantile_ms(buckets: &[(u32, u64)], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for &(b, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some(LATENCY_GROWTH.powi(b as i32) / 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::experiments::sample as exp;

    #[tokio::test]
    async fn a_client_sent_variant_cannot_move_an_outcome_to_another_arm() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SessionStore> = Arc::new(
            crate::session::MemoryStore::open(
                &crate::config::SessionSettings::default(),
                &dir.path().join("events.log"),
            )
            .unwrap(),
        );
        let e = exp("s1", &[("control", 0.5), ("alt", 0.5)]);
        let user = (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| e.assign(&format!("u:{u}")).name == "control")
            .unwrap();
        let experiments = Experiments::new(vec![e], store, RerankSettings::default());
        let click = |variant: Option<&str>| Event {
            event_id: uuid::Uuid::new_v4(),
            user_id: Some(UserId::parse(&user).unwrap()),
            session_id: None,
            item_id: crate::domain::ItemId::parse("i1").unwrap(),
            event_type: EventType::Click,
            value: None,
            timestamp_ms: 0,
            variant: variant.map(str::to_string),
            context: None,
            categories: Vec::new(),
        };
        // A forged variant, an honest one and none: all three count for the assigned arm.
        experiments
            .attribute(&[click(Some("alt")), click(Some("control")), click(None)])
            .await;
        let report = experiments.report("home").await.unwrap();
        let clicks = |name: &str| {
            report
                .variants
                .iter()
                .find(|v| v.name == name)
                .unwrap()
                .clicks
        };
        assert_eq!(clicks("alt"), 0, "the client's variant moved a click");
        assert_eq!(clicks("control"), 3);
    }

    #[test]
    fn wilson_matches_known_values() {
        // 10 of 100: the textbook interval is [0.0552, 0.1744].
        let r = wilson(10, 100);
        assert_eq!(r.value, Some(0.1));
        assert!((r.ci_low - 0.0552).abs() < 1e-3, "{r:?}");
        assert!((r.ci_high - 0.1744).abs() < 1e-3, "{r:?}");
        // No successes still gives a non-degenerate upper bound.
        let z = wilson(0, 50);
        assert_eq!(z.ci_low, 0.0);
        assert!(z.ci_high > 0.05 && z.ci_high < 0.08, "{z:?}");
        assert_eq!(wilson(0, 0).value, None);
    }

    #[test]
    fn p99_comes_from_the_latency_buckets() {
        // 99 fast responses at bucket 40 (~45 us) and one slow at bucket 100 (~13.8 ms).
        let buckets = vec![(40, 99), (100, 1)];
        let p99 = quantile_ms(&buckets, 0.99).unwrap();
        assert!((p99 - 1.1f64.powi(40) / 1000.0).abs() < 1e-9);
        let p100 = quantile_ms(&buckets, 1.0).unwrap();
        assert!(p100 > 13.0 && p100 < 14.0, "{p100}");
        assert_eq!(quantile_ms(&[], 0.99), None);
    }
}
