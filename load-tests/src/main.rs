//! `tandem-load`: a closed-loop HTTP load generator for `tandem serve`, loopback only.
//!
//! N workers each send one request at a time, picking a scenario by weight (`--mix`; by
//! default the issue's mix): 70% recommendations (known users, anonymous sessions, filtered
//! requests), 20% events, 5% similar items, 5% item upserts. The run stops at `--duration`
//! or `--requests`, whichever comes first. Latencies go into HDR histograms, per scenario and
//! overall; at the end the server's own per-stage timings are read from `/metrics`.
//!
//! Before the timed run, a warm-up posts a few events for every "known" user and session, so
//! those requests take the personal path (session read, user tower, ANN, re-rank).
//!
//! `--qdrant-collection NAME` is the bare-search baseline: `--url` is then a Qdrant server's
//! REST URL, and each recommendation scenario becomes the one search tandem's qdrant backend
//! sends for it, on that collection: top `--bare-k` (100, tandem's `k_candidates`) with
//! `hnsw_ef` 256, int8 candidates re-scored (oversampling 2), the `item_id` payload field only;
//! `rec_filtered` with its filter (category, available, and in 30% of them price <= 50).
//! The query vectors are stored item vectors, read from the collection first.

use clap::Parser;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Load generator for `tandem serve` (loopback only).
#[derive(Parser, Debug, Clone)]
#[command(name = "tandem-load")]
struct Args {
    /// Base URL of the server; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The catalog dir the server was started with (its items file supplies ids and categories).
    #[arg(long)]
    catalog: PathBuf,
    /// Timed run length in seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds of the same load run first and not counted: the timed run then measures a
    /// warm server (its first requests after a start pay for cold caches and lazy set-up).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Stop after this many requests (0: no limit).
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// Concurrent connections (each one request at a time), for the closed loop.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop instead: start this many requests per second on a fixed schedule, whatever
    /// the server does (0: closed loop with `--concurrency` connections).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Open loop: requests in flight past which a new one is counted as an error, not sent.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Known users (warmed up with events before the run).
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// Anonymous sessions (warmed up with events before the run).
    #[arg(long, default_value_t = 1_000)]
    sessions: usize,
    /// Items read from the catalog file (the first N); enough to pick from.
    #[arg(long, default_value_t = 200_000)]
    sample_items: usize,
    /// Worker threads of the generator's runtime (keep it small: it shares the box).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Open loop: also print each second's request count, p99 and max latency, to tell a
    /// stall (a few bad seconds) from a steady tail.
    #[arg(long)]
    timeline: bool,
    /// A label for the report (e.g. "memory", "redis").
    #[arg(long, default_value = "")]
    label: String,
    /// Scenario weights, e.g. `rec_known_user=30,event=0`: named scenarios take the weight
    /// given, the others keep the default mix (rec_known_user 30, rec_session 20,
    /// rec_filtered 20, event 20, similar 5, upsert 5). Weights are relative, not percent.
    #[arg(long, default_value = "", value_parser = parse_mix)]
    mix: Mix,
    /// The attribute filters of `rec_attribute`, one picked per request: query-string
    /// fragments separated by commas (`attr.brand=Aldon,attr.brand=Brisa`; a name other than
    /// `region` and `language` must be in the server's `[catalog] filterable`).
    #[arg(long, default_value = "region=eu,region=us,region=uk,region=jp,region=br", value_parser = parse_attr_filters)]
    attr_filters: AttrFilters,
    /// The server's process id: the report then gives the CPU time the server and this
    /// generator used during the timed run, per request (from /proc; the two share the box,
    /// so CPU per request is the comparison that a loaded machine does not distort much).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Bare-search baseline: `--url` is a Qdrant REST URL and the recommendation scenarios
    /// search this collection (or alias) directly; the other scenarios must weigh 0.
    #[arg(long)]
    qdrant_collection: Option<String>,
    /// Bare-search baseline: results per search.
    #[arg(long, default_value_t = 100)]
    bare_k: usize,
}

/// `--attr-filters`: query-string fragments, each `name=value` with both parts non-empty.
#[derive(Clone, Debug)]
struct AttrFilters(Vec<String>);

fn parse_attr_filters(s: &str) -> Result<AttrFilters, String> {
    let parts: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok(format!("{k}={}", encode(v))),
            _ => Err(format!("{p:?}: expected name=value")),
        })
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err("give at least one filter".into());
    }
    Ok(AttrFilters(parts))
}

/// The largest weight `--mix` takes (so that the sum cannot overflow).
const MAX_WEIGHT: u32 = 1_000_000;

/// Relative weight of each scenario, in the order of [`Scenario::ALL`].
#[derive(Clone, Debug)]
struct Mix([u32; 7]);

impl Default for Mix {
    fn default() -> Self {
        Mix(Scenario::ALL.map(Scenario::default_weight))
    }
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected scenario=weight"))?;
        let i = Scenario::ALL
            .iter()
            .position(|sc| sc.name() == name.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|sc| sc.name()).collect();
                format!("unknown scenario {name:?}; known: {}", names.join(", "))
            })?;
        mix.0[i] = weight
            .trim()
            .parse()
            .ok()
            .filter(|&w| w <= MAX_WEIGHT)
            .ok_or_else(|| {
                format!("{part:?}: the weight must be a whole number up to {MAX_WEIGHT}")
            })?;
    }
    if mix.0.iter().all(|&w| w == 0) {
        return Err("every scenario has weight 0".into());
    }
    Ok(mix)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    RecKnownUser,
    RecSession,
    RecFiltered,
    Event,
    Similar,
    Upsert,
    /// A known user's recommendations with one attribute filter (`--attr-filters`); not in
    /// the issue's mix (weight 0 unless `--mix rec_attribute=N`).
    RecAttribute,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::RecKnownUser,
        Scenario::RecSession,
        Scenario::RecFiltered,
        Scenario::Event,
        Scenario::Similar,
        Scenario::Upsert,
        Scenario::RecAttribute,
    ];

    /// The issue's mix, in percent: 70 recommendations (30 known users, 20 sessions, 20
    /// filtered), 20 events, 5 similar, 5 upserts.
    fn default_weight(self) -> u32 {
        match self {
            Scenario::RecKnownUser => 30,
            Scenario::RecSession => 20,
            Scenario::RecFiltered => 20,
            Scenario::Event => 20,
            Scenario::Similar => 5,
            Scenario::Upsert => 5,
            Scenario::RecAttribute => 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::RecKnownUser => "rec_known_user",
            Scenario::RecSession => "rec_session",
            Scenario::RecFiltered => "rec_filtered",
            Scenario::Event => "event",
            Scenario::Similar => "similar",
            Scenario::Upsert => "upsert",
            Scenario::RecAttribute => "rec_attribute",
        }
    }

    fn pick(rng: &mut StdRng, mix: &Mix) -> Scenario {
        let mut x = rng.gen_range(0..mix.0.iter().sum::<u32>());
        for (s, &w) in Scenario::ALL.iter().zip(&mix.0) {
            if x < w {
                return *s;
            }
            x -= w;
        }
        unreachable!("x is below the sum of the weights")
    }
}

struct Catalog {
    ids: Vec<String>,
    categories: Vec<String>,
    /// Bare-search baseline: query vectors (stored item vectors).
    vectors: Vec<Vec<f32>>,
}

struct Stats {
    hist: Vec<Histogram<u64>>,
    total: Histogram<u64>,
    errors: u64,
    error_samples: Vec<String>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            hist: Scenario::ALL.iter().map(|_| latency_histogram()).collect(),
            total: latency_histogram(),
            errors: 0,
            error_samples: Vec::new(),
        }
    }

    /// One answered request and its latency.
    fn record(&mut self, scenario: Scenario, latency: Duration, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                let us = latency.as_micros().max(1) as u64;
                let i = Scenario::ALL
                    .iter()
                    .position(|s| *s == scenario)
                    .unwrap_or(0);
                self.hist[i].saturating_record(us);
                self.total.saturating_record(us);
            }
            Err(e) => self.error(e),
        }
    }

    fn error(&mut self, msg: String) {
        self.errors += 1;
        if self.error_samples.len() < 10 {
            self.error_samples.push(msg);
        }
    }

    fn merge(&mut self, o: &Stats) {
        for (a, b) in self.hist.iter_mut().zip(&o.hist) {
            a.add(b).expect("same bounds");
        }
        self.total.add(&o.total).expect("same bounds");
        self.errors += o.errors;
        for s in &o.error_samples {
            if self.error_samples.len() < 10 {
                self.error_samples.push(s.clone());
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = args
        .url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    anyhow::ensure!(
        matches!(host, "127.0.0.1" | "localhost" | "[::1]"),
        "--url must be a loopback address, got {}",
        args.url
    );
    let catalog = Arc::new(read_catalog(&args)?);
    anyhow::ensure!(!catalog.ids.is_empty(), "the catalog has no items");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args, catalog))
}

fn read_catalog(args: &Args) -> anyhow::Result<Catalog> {
    let file = tandem::data::find_file(&args.catalog, "items")?;
    let mut ids = Vec::new();
    let mut categories = std::collections::BTreeSet::new();
    let stop = "enough items";
    let r = tandem::data::for_each_item(&file, |item| {
        if ids.len() >= args.sample_items {
            // Stop streaming early: an error is the only way out of the reader.
            return Err(tandem::data::DataError::Empty {
                file: PathBuf::from(stop),
                expected: String::new(),
            });
        }
        categories.extend(item.categories.iter().cloned());
        ids.push(item.item_id.to_string());
        Ok(())
    });
    match r {
        Ok(()) => {}
        Err(tandem::data::DataError::Empty { file, .. }) if file.as_os_str() == stop => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Catalog {
        ids,
        categories: categories.iter().map(|c| c.to_string()).collect(),
        vectors: Vec::new(),
    })
}

/// Query vectors for the bare-search baseline: the first `n` stored vectors of the
/// collection, by the server's scroll.
async fn sample_vectors(
    client: &reqwest::Client,
    base: &str,
    collection: &str,
    n: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let r: serde_json::Value = client
        .post(format!("{base}/collections/{collection}/points/scroll"))
        .json(&json!({ "limit": n, "with_payload": false, "with_vector": true }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let points = r["result"]["points"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("scroll of {collection}: no points in {r}"))?;
    let vectors: Vec<Vec<f32>> = points
        .iter()
        .filter_map(|p| serde_json::from_value(p["vector"].clone()).ok())
        .collect();
    anyhow::ensure!(
        !vectors.is_empty(),
        "collection {collection} holds no vectors"
    );
    Ok(vectors)
}

/// The search tandem's qdrant backend sends for a recommendation (see the module doc).
fn bare_search(
    scenario: Scenario,
    client: &reqwest::Client,
    base: &str,
    collection: &str,
    catalog: &Catalog,
    args: &Args,
    rng: &mut StdRng,
) -> reqwest::RequestBuilder {
    let vector = &catalog.vectors[rng.gen_range(0..catalog.vectors.len())];
    let mut body = json!({
        "query": vector,
        "limit": args.bare_k,
        "with_payload": ["item_id"],
        "params": { "hnsw_ef": 256, "quantization": { "rescore": true, "oversampling": 2.0 } },
    });
    if scenario == Scenario::RecFiltered && !catalog.categories.is_empty() {
        let c = &catalog.categories[rng.gen_range(0..catalog.categories.len())];
        let mut must = vec![
            json!({ "key": "categories", "match": { "any": [c] } }),
            json!({ "key": "available", "match": { "value": true } }),
        ];
        if rng.gen_bool(0.3) {
            must.push(json!({ "key": "price", "range": { "lte": 50.0 } }));
        }
        body["filter"] = json!({ "must": must });
    }
    client
        .post(format!("{base}/collections/{collection}/points/query"))
        .json(&body)
}

/// The `--timeline` counts requests at least this slow, per scenario.
const SLOW: Duration = Duration::from_millis(5);

/// Microseconds from 1 µs to 60 s, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// N connections, each sending its next request as soon as the previous one is answered:
/// the server's saturation throughput, with queueing in the latencies once it is saturated.
async fn closed_loop(
    args: &Args,
    client: &reqwest::Client,
    base: &str,
    catalog: &Arc<Catalog>,
) -> anyhow::Result<Stats> {
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, base, catalog, sent, args) = (
            client.clone(),
            base.to_string(),
            catalog.clone(),
            sent.clone(),
            args.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(args.seed ^ ((w as u64 + 1) * 0x9e37_79b9));
            let mut stats = Stats::new();
            let mut upserts = 0u64;
            while Instant::now() < deadline {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if args.requests > 0 && n >= args.requests {
                    break;
                }
                let scenario = Scenario::pick(&mut rng, &args.mix);
                let req = build(
                    scenario,
                    &client,
                    &base,
                    &catalog,
                    &args,
                    &mut rng,
                    w,
                    &mut upserts,
                );
                let t = Instant::now();
                let outcome = send(scenario, req).await;
                stats.record(scenario, t.elapsed(), outcome);
            }
            stats
        }));
    }
    let mut stats = Stats::new();
    for w in workers {
        stats.merge(&w.await?);
    }
    Ok(stats)
}

/// Requests start on a fixed schedule of `--rate` per second, whether or not earlier ones
/// were answered, so a stalled server cannot hide its stall by slowing the generator (no
/// coordinated omission). This is the latency a server shows at a given traffic level.
/// Each latency counts from the moment the request was sent; how late the generator sent
/// against its schedule (tokio's timer ticks every 1 ms, and the generator shares the CPU)
/// is reported apart, so that it is not charged to the server.
async fn open_loop(
    args: &Args,
    client: &reqwest::Client,
    base: &str,
    catalog: &Arc<Catalog>,
) -> anyhow::Result<Stats> {
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let total = (args.rate * args.duration as f64) as u64;
    let total = if args.requests > 0 {
        total.min(args.requests)
    } else {
        total
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut upserts = 0u64;
    let mut refused = 0u64;
    let mut lateness = latency_histogram();
    let start = tokio::time::Instant::now();
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        // A sleep, even to a past instant, waits for the timer's next 1 ms tick: behind
        // schedule, send at once.
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let scenario = Scenario::pick(&mut rng, &args.mix);
        let req = build(
            scenario,
            client,
            base,
            catalog,
            args,
            &mut rng,
            0,
            &mut upserts,
        );
        // Past the cap the server is not keeping up; count the request as an error rather
        // than letting in-flight requests (and the generator's memory) grow without bound.
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            refused += 1;
            continue;
        };
        let sent = Instant::now();
        lateness.saturating_record(due.elapsed().as_micros().max(1) as u64);
        let second = (n as f64 / args.rate) as usize;
        let tx = tx.clone();
        tokio::spawn(async move {
            let outcome = send(scenario, req).await;
            let _ = tx.send((scenario, second, sent.elapsed(), outcome));
            drop(permit);
        });
    }
    drop(tx);
    println!(
        "generator lateness against its schedule: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        lateness.value_at_quantile(0.5) as f64 / 1000.0,
        lateness.value_at_quantile(0.99) as f64 / 1000.0,
        lateness.max() as f64 / 1000.0
    );
    let mut stats = Stats::new();
    let mut per_second: Vec<(Histogram<u64>, [u32; Scenario::ALL.len()])> = Vec::new();
    while let Some((scenario, second, latency, outcome)) = rx.recv().await {
        if args.timeline {
            if per_second.len() <= second {
                per_second.resize_with(second + 1, || {
                    (latency_histogram(), [0; Scenario::ALL.len()])
                });
            }
            let (h, slow) = &mut per_second[second];
            h.saturating_record(latency.as_micros().max(1) as u64);
            if latency >= SLOW {
                slow[scenario as usize] += 1;
            }
        }
        stats.record(scenario, latency, outcome);
    }
    for (second, (h, slow)) in per_second.iter().enumerate() {
        let slow: Vec<String> = Scenario::ALL
            .iter()
            .filter(|s| slow[**s as usize] > 0)
            .map(|s| format!("{} {}", s.name(), slow[*s as usize]))
            .collect();
        println!(
            "second {second:>3}: {:>5} requests, p99 {:>7.3} ms, max {:>7.3} ms; over {} ms: {}",
            h.len(),
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
            SLOW.as_millis(),
            slow.join(", ")
        );
    }
    for _ in 0..refused {
        stats.error(format!("over {} requests in flight", args.max_in_flight));
    }
    Ok(stats)
}

/// Sends one request and reads the whole body (the latency includes it); an error names the
/// scenario and what went wrong.
async fn send(scenario: Scenario, req: reqwest::RequestBuilder) -> Result<(), String> {
    let r = req
        .send()
        .await
        .map_err(|e| format!("{}: {e}", scenario.name()))?;
    let status = r.status();
    let body = r
        .bytes()
        .await
        .map_err(|e| format!("{}: {e}", scenario.name()))?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{} {status}: {}",
            scenario.name(),
            String::from_utf8_lossy(&body)
        ))
    }
}

async fn run(args: Args, catalog: Arc<Catalog>) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(args.max_in_flight))
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = args.url.trim_end_matches('/').to_string();
    let ready = client.get(format!("{base}/readyz")).send().await?;
    anyhow::ensure!(
        ready.status().is_success(),
        "server not ready: {}",
        ready.text().await?
    );
    if let Some(collection) = &args.qdrant_collection {
        return run_bare(&args, catalog, &client, &base, collection).await;
    }

    eprintln!(
        "warming up: events for {} users and {} sessions",
        args.users, args.sessions
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let warm = Instant::now();
    for chunk_start in (0..args.users + args.sessions).step_by(100) {
        let batch: Vec<serde_json::Value> = (chunk_start
            ..(chunk_start + 100).min(args.users + args.sessions))
            .flat_map(|n| {
                let actor = actor(n, args.users);
                (0..5)
                    .map(|_| event_body(&actor, &catalog, &mut rng))
                    .collect::<Vec<_>>()
            })
            .collect();
        let r = client
            .post(format!("{base}/v1/events"))
            .json(&batch)
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "warm-up events: {}",
            r.text().await?
        );
    }
    eprintln!("warm-up done in {:.1}s", warm.elapsed().as_secs_f64());

    if args.warmup > 0 {
        eprintln!(
            "warm-up load: {} s, not counted (its lines below are not the run's)",
            args.warmup
        );
        let warm_args = Args {
            duration: args.warmup,
            requests: 0,
            timeline: false,
            // Other requests than the timed run's, so that it finds no answers cached for it.
            seed: args.seed.wrapping_add(1),
            ..args.clone()
        };
        if args.rate > 0.0 {
            open_loop(&warm_args, &client, &base, &catalog).await?;
        } else {
            closed_loop(&warm_args, &client, &base, &catalog).await?;
        }
    }
    let cache_before = candidate_cache(&client, &base).await;

    let cpu_before = Cpu::now(args.server_pid);
    let started = Instant::now();
    let stats = if args.rate > 0.0 {
        open_loop(&args, &client, &base, &catalog).await?
    } else {
        closed_loop(&args, &client, &base, &catalog).await?
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = Cpu::now(args.server_pid).since(&cpu_before);
    report(&args, &stats, elapsed, &cpu);
    let cache_after = candidate_cache(&client, &base).await;
    let (hits, misses) = (
        cache_after.0 - cache_before.0,
        cache_after.1 - cache_before.1,
    );
    if hits + misses > 0.0 {
        println!(
            "candidate cache during the timed run: {hits} hits, {misses} misses ({:.1}% hits)",
            100.0 * hits / (hits + misses)
        );
    }

    match client.get(format!("{base}/metrics")).send().await {
        Ok(r) => print_stage_breakdown(&r.text().await.unwrap_or_default()),
        Err(e) => eprintln!("could not read /metrics: {e}"),
    }
    Ok(())
}

/// The bare-search baseline: no warm-up events, no tandem metrics.
async fn run_bare(
    args: &Args,
    catalog: Arc<Catalog>,
    client: &reqwest::Client,
    base: &str,
    collection: &str,
) -> anyhow::Result<()> {
    let recs = [
        Scenario::RecKnownUser,
        Scenario::RecSession,
        Scenario::RecFiltered,
    ];
    anyhow::ensure!(
        Scenario::ALL
            .iter()
            .zip(&args.mix.0)
            .all(|(s, &w)| w == 0 || recs.contains(s)),
        "--qdrant-collection: only rec_known_user, rec_session and rec_filtered can have a weight"
    );
    let mut catalog = Arc::try_unwrap(catalog).unwrap_or_else(|c| Catalog {
        ids: c.ids.clone(),
        categories: c.categories.clone(),
        vectors: Vec::new(),
    });
    catalog.vectors = sample_vectors(client, base, collection, 2_000).await?;
    eprintln!(
        "bare Qdrant search on {collection}: {} query vectors, {} categories",
        catalog.vectors.len(),
        catalog.categories.len()
    );
    let catalog = Arc::new(catalog);
    if args.warmup > 0 {
        let warm_args = Args {
            duration: args.warmup,
            requests: 0,
            timeline: false,
            seed: args.seed.wrapping_add(1),
            ..args.clone()
        };
        if args.rate > 0.0 {
            open_loop(&warm_args, client, base, &catalog).await?;
        } else {
            closed_loop(&warm_args, client, base, &catalog).await?;
        }
    }
    let cpu_before = Cpu::now(args.server_pid);
    let started = Instant::now();
    let stats = if args.rate > 0.0 {
        open_loop(args, client, base, &catalog).await?
    } else {
        closed_loop(args, client, base, &catalog).await?
    };
    let cpu = Cpu::now(args.server_pid).since(&cpu_before);
    report(args, &stats, started.elapsed().as_secs_f64(), &cpu);
    Ok(())
}

fn actor(n: usize, users: usize) -> (&'static str, String) {
    if n < users {
        ("user_id", format!("load-u{n}"))
    } else {
        ("session_id", format!("load-s{}", n - users))
    }
}

fn event_body(actor: &(&str, String), catalog: &Catalog, rng: &mut StdRng) -> serde_json::Value {
    let item = &catalog.ids[rng.gen_range(0..catalog.ids.len())];
    let ty = ["view", "click", "click", "add_to_cart"][rng.gen_range(0..4)];
    json!({ actor.0: actor.1, "item_id": item, "type": ty })
}

#[allow(clippy::too_many_arguments)]
fn build(
    scenario: Scenario,
    client: &reqwest::Client,
    base: &str,
    catalog: &Catalog,
    args: &Args,
    rng: &mut StdRng,
    worker: usize,
    upserts: &mut u64,
) -> reqwest::RequestBuilder {
    if let Some(collection) = &args.qdrant_collection {
        return bare_search(scenario, client, base, collection, catalog, args, rng);
    }
    let url = |path: &str| format!("{base}{path}");
    match scenario {
        Scenario::RecKnownUser => {
            let u = rng.gen_range(0..args.users.max(1));
            client.get(url(&format!("/v1/recommendations?user_id=load-u{u}&k=20")))
        }
        Scenario::RecSession => {
            let s = rng.gen_range(0..args.sessions.max(1));
            client.get(url(&format!(
                "/v1/recommendations?session_id=load-s{s}&k=20"
            )))
        }
        Scenario::RecFiltered => {
            let u = rng.gen_range(0..args.users.max(1));
            let mut q = format!("/v1/recommendations?user_id=load-u{u}&k=20&available_only=true");
            if !catalog.categories.is_empty() {
                let c = &catalog.categories[rng.gen_range(0..catalog.categories.len())];
                q.push_str(&format!("&category={}", encode(c)));
            }
            if rng.gen_bool(0.3) {
                q.push_str("&price_max=50");
            }
            client.get(url(&q))
        }
        Scenario::RecAttribute => {
            let u = rng.gen_range(0..args.users.max(1));
            let f = &args.attr_filters.0[rng.gen_range(0..args.attr_filters.0.len())];
            client.get(url(&format!(
                "/v1/recommendations?user_id=load-u{u}&k=20&{f}"
            )))
        }
        Scenario::Event => {
            let a = actor(rng.gen_range(0..args.users + args.sessions), args.users);
            client
                .post(url("/v1/events"))
                .json(&event_body(&a, catalog, rng))
        }
        Scenario::Similar => {
            let item = &catalog.ids[rng.gen_range(0..catalog.ids.len())];
            client.get(url(&format!("/v1/items/{}/similar?k=20", encode(item))))
        }
        Scenario::Upsert => {
            *upserts += 1;
            let cat = catalog
                .categories
                .get(rng.gen_range(0..catalog.categories.len().max(1)))
                .cloned()
                .unwrap_or_default();
            let body = json!({ "items": [{
                "item_id": format!("load-new-{worker}-{upserts}"),
                "title": format!("load test item {upserts}"),
                "categories": [cat],
                "price": rng.gen_range(1.0..100.0),
            }]});
            // Catalog writes need the admin key (the server's TANDEM_ADMIN_KEY).
            let req = client.post(url("/v1/items")).json(&body);
            match std::env::var("TANDEM_ADMIN_KEY") {
                Ok(key) if !key.is_empty() => req.header("X-API-Key", key),
                _ => req,
            }
        }
    }
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// CPU seconds (user + system) of the server and of this process, from /proc.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    server: Option<f64>,
    generator: Option<f64>,
}

impl Cpu {
    fn now(server_pid: Option<u32>) -> Cpu {
        Cpu {
            server: server_pid.and_then(|p| process_cpu_secs(&p.to_string())),
            generator: process_cpu_secs("self"),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Cpu {
            server: d(self.server, before.server),
            generator: d(self.generator, before.generator),
        }
    }
}

/// utime + stime of /proc/PID/stat (fields 14 and 15, after the parenthesised name), in
/// seconds; `None` when unreadable (not Linux, no such process).
fn process_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

fn report(args: &Args, stats: &Stats, elapsed: f64, cpu: &Cpu) {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ok = stats.total.len();
    let mode = if args.rate > 0.0 {
        format!("open loop at {} req/s offered", args.rate)
    } else {
        format!("{} connections", args.concurrency)
    };
    println!(
        "{} requests ok, {} errors, {:.1}s, {:.0} req/s ({mode}{})",
        ok,
        stats.errors,
        elapsed,
        ok as f64 / elapsed,
        if args.label.is_empty() {
            String::new()
        } else {
            format!(", {}", args.label)
        }
    );
    println!(
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "scenario", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let row = |name: &str, h: &Histogram<u64>| {
        println!(
            "{:<16} {:>8} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            name,
            h.len(),
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        )
    };
    for (s, h) in Scenario::ALL.iter().zip(&stats.hist) {
        row(s.name(), h);
    }
    row("all", &stats.total);
    for e in &stats.error_samples {
        println!("error: {e}");
    }
    let per_request = |secs: Option<f64>| secs.filter(|_| ok > 0).map(|s| s * 1e3 / ok as f64);
    if let Some(ms) = per_request(cpu.server) {
        println!(
            "server CPU during the run: {:.1} s, {ms:.3} ms per request ({:.2} cores)",
            cpu.server.unwrap_or_default(),
            cpu.server.unwrap_or_default() / elapsed
        );
    }
    if let Some(ms) = per_request(cpu.generator) {
        println!(
            "generator CPU during the run: {:.1} s, {ms:.3} ms per request ({:.2} cores)",
            cpu.generator.unwrap_or_default(),
            cpu.generator.unwrap_or_default() / elapsed
        );
    }
    let json = json!({
        "label": args.label,
        "ok": ok,
        "errors": stats.errors,
        "seconds": elapsed,
        "rps": ok as f64 / elapsed,
        "p50_ms": ms(&stats.total, 0.5),
        "p90_ms": ms(&stats.total, 0.9),
        "p99_ms": ms(&stats.total, 0.99),
        "p999_ms": ms(&stats.total, 0.999),
        "server_cpu_ms_per_request": per_request(cpu.server),
        "generator_cpu_ms_per_request": per_request(cpu.generator),
        "concurrency": args.concurrency,
        "rate": args.rate,
        "mix": Scenario::ALL.iter().zip(&args.mix.0).map(|(s, w)| (s.name(), *w)).collect::<BTreeMap<_, _>>(),
    });
    println!("{json}");
}

/// The server's candidate-cache (hits, misses) so far, from `/metrics` (zeros if unreadable).
async fn candidate_cache(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let Ok(r) = client.get(format!("{base}/metrics")).send().await else {
        return (0.0, 0.0);
    };
    let text = r.text().await.unwrap_or_default();
    let count = |result: &str| -> f64 {
        let prefix = format!("tandem_candidate_cache_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (count("hit"), count("miss"))
}

/// Prints the server's per-stage latencies from its Prometheus histograms
/// (`tandem_stage_seconds`, `tandem_pipeline_seconds`): count, mean, and p50 / p99
/// interpolated within the histogram buckets.
fn print_stage_breakdown(metrics: &str) {
    println!("server-side stage latencies (over the server's lifetime, ms; p50/p99 from buckets):");
    // series labels (without `le`) -> (upper bound, cumulative count) pairs, sum, count
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line
            .strip_prefix("tandem_stage_seconds")
            .or_else(|| line.strip_prefix("tandem_pipeline_seconds"))
        else {
            continue;
        };
        let Some((name, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = value.parse().unwrap_or(f64::NAN);
        if let Some(labels) = name.strip_prefix("_bucket{") {
            let Some((series, le)) = labels.rsplit_once("le=\"") else {
                continue;
            };
            let le = le.trim_end_matches("\"}");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let series = series.trim_end_matches(',').to_string();
            buckets.entry(series).or_default().push((le, v));
        } else if let Some(labels) = name.strip_prefix("_sum{") {
            sums.entry(labels.trim_end_matches('}').to_string())
                .or_default()
                .0 = v;
        } else if let Some(labels) = name.strip_prefix("_count{") {
            sums.entry(labels.trim_end_matches('}').to_string())
                .or_default()
                .1 = v;
        }
    }
    for (series, mut b) in buckets {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let (sum, count) = sums.get(&series).copied().unwrap_or_default();
        if count == 0.0 {
            continue;
        }
        let q = |p: f64| -> f64 {
            let target = p * count;
            let mut prev = (0.0, 0.0);
            for &(le, c) in &b {
                if c >= target {
                    if le.is_infinite() {
                        return prev.0;
                    }
                    return prev.0 + (le - prev.0) * (target - prev.1) / (c - prev.1).max(1e-9);
                }
                prev = (le, c);
            }
            prev.0
        };
        println!(
            "  {series:32} n={count:<8} mean={:.3} p50={:.3} p99={:.3}",
            sum / count * 1e3,
            q(0.5) * 1e3,
            q(0.99) * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_overrides_named_scenarios_and_keeps_the_rest() {
        assert_eq!(parse_mix("").unwrap().0, [30, 20, 20, 20, 5, 5, 0]);
        let m = parse_mix("event=0, upsert=0, rec_attribute=10").unwrap();
        assert_eq!(m.0, [30, 20, 20, 0, 5, 0, 10]);
        let mut rng = StdRng::seed_from_u64(1);
        let picked: Vec<Scenario> = (0..2_000).map(|_| Scenario::pick(&mut rng, &m)).collect();
        assert!(!picked.contains(&Scenario::Event) && !picked.contains(&Scenario::Upsert));
        assert!(picked.contains(&Scenario::Similar) && picked.contains(&Scenario::RecAttribute));
        assert!(!(0..2_000)
            .map(|_| Scenario::pick(&mut rng, &parse_mix("").unwrap()))
            .any(|s| s == Scenario::RecAttribute));
    }

    #[test]
    fn attribute_filters_are_query_fragments() {
        let f = parse_attr_filters("region=eu, attr.brand=Rivet & Co").unwrap();
        assert_eq!(f.0, ["region=eu", "attr.brand=Rivet+%26+Co"]);
        assert!(parse_attr_filters("region").is_err());
        assert!(parse_attr_filters(" , ").is_err());
    }

    #[test]
    fn bad_mix_names_the_problem() {
        assert!(parse_mix("events=1")
            .unwrap_err()
            .contains("unknown scenario"));
        assert!(parse_mix("event").unwrap_err().contains("scenario=weight"));
        assert!(parse_mix("event=-1").unwrap_err().contains("whole number"));
        assert!(parse_mix("event=4000000000")
            .unwrap_err()
            .contains("up to 1000000"));
        let all_zero = Scenario::ALL.map(|s| format!("{}=0", s.name())).join(",");
        assert!(parse_mix(&all_zero).unwrap_err().contains("weight 0"));
    }
}
