//! `tandem bench ann`: build a backend from generated clustered vectors and measure build
//! time, search latency, recall against exact search, upsert visibility and memory.
//!
//! The vectors imitate trained item embeddings, which cluster by category: each item belongs
//! to one of [`CLUSTERS`] categories and lies near that category's centre. A filter keeping a
//! fraction F selects whole categories, the hard case for filtered graph search.
//!
//! Items also carry two attributes, filtered on at the same selectivities: `tier`, one of
//! 100 values spread over the catalog independently of the vectors (as region or language
//! would be), and `brand`, one per category (so a brand filter selects whole clusters, as a
//! brand that makes one kind of product does).

use super::exact::ExactCollection;
use super::{build_version, IndexError, IndexPoint, Payload, VectorIndex};
use crate::domain::{AttrValue, Filter, ItemId};
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashSet;
use std::time::Instant;

/// Categories (clusters) of the generated catalog; a filter keeping 1% is one category.
pub const CLUSTERS: usize = 100;
/// Neighbours asked for per query.
pub const K: usize = 100;
/// The attribute names of the generated catalog (to declare filterable).
pub const ATTRIBUTES: [&str; 2] = ["tier", "brand"];
/// Spread of items around their cluster centre, per dimension.
const NOISE: f32 = 0.08;

/// What to run.
#[derive(Debug, Clone)]
pub struct AnnBenchParams {
    pub items: usize,
    pub dim: usize,
    pub queries: usize,
    /// Fractions of items a filtered query keeps (whole categories); one filtered run each.
    pub filter_selectivity: Vec<f64>,
    pub seed: u64,
}

/// Latency and recall of one query set.
#[derive(Debug, Clone, Serialize)]
pub struct QueryStats {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
}

/// Latency and recall under a filter keeping whole categories.
#[derive(Debug, Clone, Serialize)]
pub struct FilteredStats {
    /// The selectivity asked for.
    pub selectivity: f64,
    /// Fraction of items the filter actually keeps.
    pub fraction: f64,
    #[serde(flatten)]
    pub stats: QueryStats,
}

/// Latency and recall under an attribute filter (`attr.tier` or `attr.brand`).
#[derive(Debug, Clone, Serialize)]
pub struct AttributeFilteredStats {
    /// `tier` (independent of the vectors) or `brand` (whole clusters).
    pub attribute: String,
    pub selectivity: f64,
    pub fraction: f64,
    #[serde(flatten)]
    pub stats: QueryStats,
}

/// The JSON line `tandem bench ann` prints.
#[derive(Debug, Clone, Serialize)]
pub struct AnnBenchReport {
    pub backend: String,
    pub items: usize,
    pub dim: usize,
    pub queries: usize,
    pub k: usize,
    pub build_secs: f64,
    pub upsert_secs: f64,
    pub finalize_secs: f64,
    pub unfiltered: QueryStats,
    /// One entry per requested selectivity.
    pub filtered: Vec<FilteredStats>,
    /// Per requested selectivity, an attribute filter on `tier` and one on `brand`.
    pub attribute_filtered: Vec<AttributeFilteredStats>,
    /// Milliseconds from the start of a single-item upsert until a search finds it.
    pub upsert_visible_ms: f64,
    /// Resident memory after the build, before the exact oracle is built (MB).
    pub serving_rss_mb: f64,
    /// Peak resident memory of the whole run, oracle included (MB).
    pub peak_rss_mb: f64,
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller; rand 0.8 without rand_distr.
    let u1: f32 = rng.gen::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    super::validate::normalized(&v)
}

/// The generated catalog: deterministic for a seed, so it can be streamed twice (once into
/// the backend, once into the oracle) without holding it in memory.
pub struct Generator {
    dim: usize,
    centres: Vec<Vec<f32>>,
    seed: u64,
}

impl Generator {
    pub fn new(dim: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = (0..CLUSTERS)
            .map(|_| unit((0..dim).map(|_| gaussian(&mut rng)).collect()))
            .collect();
        Generator { dim, centres, seed }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn category(c: usize) -> String {
        format!("c{c:03}")
    }

    /// The `tier` of item `i`: one of 100, spread evenly and independently of the category.
    pub fn tier_of(i: usize) -> usize {
        (i / CLUSTERS * 37 + i * 7) % 100
    }

    pub fn tier(t: usize) -> String {
        format!("t{t:02}")
    }

    /// The `brand` of the items of category `c`.
    pub fn brand(c: usize) -> String {
        format!("b{c:03}")
    }

    /// A filter keeping about `fraction` of the items by an attribute (`tier` or `brand`),
    /// and the fraction it keeps of `n` items.
    pub fn attribute_filter(attribute: &str, fraction: f64, n: usize) -> (Filter, f64) {
        let values = ((fraction * 100.0).round() as usize).clamp(1, 100);
        let (names, kept): (Vec<String>, usize) = if attribute == "brand" {
            (
                (0..values).map(Self::brand).collect(),
                (0..n).filter(|i| i % CLUSTERS < values).count(),
            )
        } else {
            (
                (0..values).map(Self::tier).collect(),
                (0..n).filter(|&i| Self::tier_of(i) < values).count(),
            )
        };
        let mut filter = Filter::default();
        filter.attributes.any.insert(attribute.to_string(), names);
        (filter, kept as f64 / n.max(1) as f64)
    }

    fn near(&self, rng: &mut StdRng, c: usize) -> Vec<f32> {
        unit(
            self.centres[c]
                .iter()
                .map(|x| x + NOISE * gaussian(rng))
                .collect(),
        )
    }

    /// Item `i` of the catalog, in category `i % CLUSTERS`.
    pub fn points(&self, n: usize) -> impl Iterator<Item = IndexPoint> + '_ {
        self.items(n).map(|(payload, vector)| IndexPoint {
            vector: vector.into(),
            payload,
        })
    }

    /// [`Self::points`] with their vectors in full precision (the index holds them in half).
    pub fn items(&self, n: usize) -> impl Iterator<Item = (Payload, Vec<f32>)> + '_ {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed);
        (0..n).map(move |i| {
            let c = i % CLUSTERS;
            (
                Payload {
                    item_id: ItemId::parse(format!("i{i}")).expect("generated ids are valid"),
                    categories: vec![Self::category(c).into()],
                    available: true,
                    price: Some((i % 100) as f32),
                    created_at: Some(i as i64),
                    title: String::new(),
                    popularity: 0.0,
                    tags: Vec::new(),
                    year: None,
                    attributes: [
                        (
                            "tier".into(),
                            AttrValue::Text(Self::tier(Self::tier_of(i)).into()),
                        ),
                        ("brand".into(), AttrValue::Text(Self::brand(c).into())),
                    ]
                    .into(),
                },
                self.near(&mut rng, c),
            )
        })
    }

    /// Query vectors from the same distribution as the items.
    pub fn queries(&self, q: usize) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e3779b9);
        (0..q)
            .map(|_| {
                let c = rng.gen_range(0..CLUSTERS);
                self.near(&mut rng, c)
            })
            .collect()
    }
}

/// Current and peak resident memory (MB) from /proc/self/status; zeros elsewhere.
pub fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn recall(got: &[ItemId], truth: &[ItemId], at: usize) -> f64 {
    let truth: HashSet<&ItemId> = truth.iter().take(at).collect();
    if truth.is_empty() {
        return 1.0;
    }
    let hits = got.iter().take(at).filter(|id| truth.contains(id)).count();
    hits as f64 / truth.len() as f64
}

/// Runs the queries against `index`, timing each; returns the ids found and the latencies.
async fn run_queries(
    index: &dyn VectorIndex,
    queries: &[Vec<f32>],
    filter: &Filter,
) -> Result<(Vec<Vec<ItemId>>, Vec<f64>), IndexError> {
    let mut found = Vec::with_capacity(queries.len());
    let mut ms = Vec::with_capacity(queries.len());
    for q in queries {
        let t = Instant::now();
        let hits = index.search(q, filter, K).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        found.push(hits.into_iter().map(|h| h.item_id.clone()).collect());
    }
    Ok((found, ms))
}

fn stats(found: &[Vec<ItemId>], truth: &[Vec<ItemId>], mut ms: Vec<f64>) -> QueryStats {
    ms.sort_by(f64::total_cmp);
    let n = found.len().max(1) as f64;
    QueryStats {
        p50_ms: percentile(&ms, 0.5),
        p99_ms: percentile(&ms, 0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        recall_at_10: found
            .iter()
            .zip(truth)
            .map(|(g, t)| recall(g, t, 10))
            .sum::<f64>()
            / n,
        recall_at_100: found
            .iter()
            .zip(truth)
            .map(|(g, t)| recall(g, t, K))
            .sum::<f64>()
            / n,
    }
}

/// Builds `index` from the generated catalog and measures it against exact search.
pub async fn run(
    index: &dyn VectorIndex,
    backend: &str,
    params: &AnnBenchParams,
) -> Result<AnnBenchReport, IndexError> {
    let gen = Generator::new(params.dim, params.seed);
    let bar = ProgressBar::new(params.items as u64);
    let build = build_version(index, "bench", params.dim, gen.points(params.items), &bar).await?;

    let queries = gen.queries(params.queries);
    let filters: Vec<(f64, Filter)> = params
        .filter_selectivity
        .iter()
        .map(|&f| {
            let cats = ((f * CLUSTERS as f64).round() as usize).clamp(1, CLUSTERS);
            let filter = Filter {
                include_categories: (0..cats).map(Generator::category).collect(),
                ..Default::default()
            };
            (f, filter)
        })
        .collect();
    // Warm up before timing: one untimed pass of every query, so that the mmapped graph and
    // vectors they touch are in the page cache, as in a server that has been up a while.
    for q in &queries {
        index.search(q, &Filter::default(), K).await?;
    }
    let (unf_found, unf_ms) = run_queries(index, &queries, &Filter::default()).await?;
    let mut filtered_runs = Vec::new();
    for (_, f) in &filters {
        filtered_runs.push(run_queries(index, &queries, f).await?);
    }
    let mut attribute_runs = Vec::new();
    for &selectivity in &params.filter_selectivity {
        for attribute in ["tier", "brand"] {
            let (f, fraction) = Generator::attribute_filter(attribute, selectivity, params.items);
            let run = run_queries(index, &queries, &f).await?;
            attribute_runs.push((attribute, selectivity, fraction, f, run));
        }
    }

    // Single-item upsert visibility.
    let probe = IndexPoint {
        vector: gen.queries(1).pop().expect("one query").into(),
        payload: Payload {
            item_id: ItemId::parse("probe").expect("valid id"),
            categories: vec!["probe".into()],
            available: true,
            price: None,
            created_at: None,
            title: String::new(),
            popularity: 0.0,
            tags: Vec::new(),
            year: None,
            attributes: Default::default(),
        },
    };
    let probe_filter = Filter {
        include_categories: vec!["probe".into()],
        ..Default::default()
    };
    let t = Instant::now();
    index.upsert(vec![probe.clone()]).await?;
    while index
        .search(&probe.vector.to_vec(), &probe_filter, 1)
        .await?
        .is_empty()
    {
        if t.elapsed().as_secs() > 10 {
            return Err(IndexError::Backend(
                "the upserted probe never became visible".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let upsert_visible_ms = t.elapsed().as_secs_f64() * 1e3;
    index
        .delete(std::slice::from_ref(&probe.payload.item_id))
        .await?;
    let (serving_rss_mb, _) = rss_mb();

    // The oracle: the same catalog, searched exactly, on the generated f32 vectors (the index
    // holds them in half precision; its recall counts what that rounding costs).
    tracing::info!("computing exact ground truth");
    let mut oracle = ExactCollection::new(params.dim);
    oracle.upsert_f32(gen.items(params.items));
    let truth = |f: &Filter| -> Result<Vec<Vec<ItemId>>, IndexError> {
        queries
            .iter()
            .map(|q| {
                Ok(oracle
                    .search(q, f, K)?
                    .into_iter()
                    .map(|h| h.item_id.clone())
                    .collect())
            })
            .collect()
    };
    let unfiltered = stats(&unf_found, &truth(&Filter::default())?, unf_ms);
    let mut filtered = Vec::new();
    for ((selectivity, f), (found, ms)) in filters.iter().zip(filtered_runs) {
        let cats = f.include_categories.len();
        let kept = (0..params.items).filter(|i| i % CLUSTERS < cats).count();
        filtered.push(FilteredStats {
            selectivity: *selectivity,
            fraction: kept as f64 / params.items as f64,
            stats: stats(&found, &truth(f)?, ms),
        });
    }
    let mut attribute_filtered = Vec::new();
    for (attribute, selectivity, fraction, f, (found, ms)) in attribute_runs {
        attribute_filtered.push(AttributeFilteredStats {
            attribute: attribute.to_string(),
            selectivity,
            fraction,
            stats: stats(&found, &truth(&f)?, ms),
        });
    }
    let (_, peak_rss_mb) = rss_mb();
    Ok(AnnBenchReport {
        backend: backend.to_string(),
        items: params.items,
        dim: params.dim,
        queries: params.queries,
        k: K,
        build_secs: build.total_secs,
        upsert_secs: build.upsert_secs,
        finalize_secs: build.finalize_secs,
        unfiltered,
        filtered,
        attribute_filtered,
        upsert_visible_ms,
        serving_rss_mb,
        peak_rss_mb,
    })
}
