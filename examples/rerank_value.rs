//! Does the re-ranker add anything? An offline replay on an evaluation split.
//!
//! Every scored user (test and onboarding) gets their known interactions (train + onboard,
//! newest first) as history in a memory session store; the newest `--session` of them are the
//! session the re-ranker looks at. The real `Recommender` then makes top-20 lists twice:
//! variant `off` (ANN order only: every other weight 0, no MMR) and variant `on` (the
//! configured control weights). Known items are excluded by the request filter, as the
//! protocol requires. Both lists are written as `user_id,item_id,rank` CSVs for score.py.
//!
//! ```text
//! cargo run --release --example rerank_value -- --split /work/shared/eval/ml-latest-small \
//!     --model models/ml-small --out /tmp/rerank-value
//! python3 /work/shared/eval/score.py --split ... --recs /tmp/rerank-value/on.csv --compare /tmp/rerank-value/off.csv
//! ```

use anyhow::Context as _;
use clap::Parser;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tandem::catalog::Catalog;
use tandem::config::{IndexBackend, RerankWeights, SessionBackend, Settings, CONTROL_VARIANT};
use tandem::domain::{Filter, Interaction, ItemId, UserId};
use tandem::experiment::Experiments;
use tandem::index::{IndexPoint, Payload};
use tandem::model::TwoTower;
use tandem::pipeline::{Parts, RecommendRequest, Recommender};
use tandem::session::RecentItem;

#[derive(Parser)]
struct Args {
    /// A split dir (items.csv, train.csv, test.csv, onboard.csv, onboard_test.csv).
    #[arg(long)]
    split: PathBuf,
    /// A checkpoint trained on that split's known data; trained there (default settings,
    /// train + onboard) when the directory holds none yet.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Session length: the newest N known interactions.
    #[arg(long, default_value_t = 5)]
    session: usize,
    /// Score the validation slice instead (val/train.csv known, val/test.csv scored).
    #[arg(long)]
    val: bool,
    /// Candidates fetched from the index per request (the server's `k_candidates`).
    #[arg(long)]
    k_candidates: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Runtime::new()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let read = |name: &str| -> anyhow::Result<Vec<Interaction>> {
        let p = args.split.join(name);
        if !p.exists() {
            return Ok(Vec::new());
        }
        tandem::data::read_interactions(&p).with_context(|| p.display().to_string())
    };
    let items = tandem::data::read_items(&args.split.join("items.csv"))?;
    let (known, scored) = if args.val {
        (read("val/train.csv")?, read("val/test.csv")?)
    } else {
        let mut known = read("train.csv")?;
        known.extend(read("onboard.csv")?);
        let mut scored = read("test.csv")?;
        scored.extend(read("onboard_test.csv")?);
        (known, scored)
    };
    if !args.model.join("manifest.json").exists() {
        eprintln!(
            "training a model on {} into {}",
            args.split.display(),
            args.model.display()
        );
        let cfg = tandem::model::TrainConfig {
            progress: false,
            ..Default::default()
        };
        let (model, report) = tandem::model::train_on_split(&cfg, &args.split, false)?;
        eprintln!("trained: {report:?}");
        model.save(&args.model)?;
    }
    let model = TwoTower::load(&args.model)?;
    eprintln!(
        "model {} ({} items, {} known rows)",
        model.version(),
        items.len(),
        known.len()
    );

    let dir = tempfile::tempdir()?;
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.index.backend = IndexBackend::Exact;
    settings.session.backend = SessionBackend::Memory;
    settings.server.history_limit = 50;
    if let Some(k) = args.k_candidates {
        settings.server.k_candidates = k;
    }
    let control = RerankWeights {
        session_window: args.session,
        ..settings.rerank.for_variant("control").clone()
    };
    let off = RerankWeights {
        ann: 1.0,
        session_max: 0.0,
        session_mean: 0.0,
        category_affinity: 0.0,
        trending: 0.0,
        freshness: 0.0,
        viewed_penalty: 0.0,
        mmr_lambda: 1.0,
        category_repeat: 0.0,
        ..control.clone()
    };
    settings.rerank.0.insert("on".into(), control);
    settings.rerank.0.insert("off".into(), off);

    // Index the catalog with popularity = known interaction counts.
    let mut counts: HashMap<&ItemId, f32> = HashMap::new();
    for i in &known {
        *counts.entry(&i.item_id).or_default() += 1.0;
    }
    let vectors = model.embed_items(&items)?;
    let points: Vec<IndexPoint> = items
        .iter()
        .zip(vectors)
        .map(|(it, vector)| IndexPoint {
            vector: vector.into(),
            payload: Payload {
                tags: Vec::new(),
                year: None,
                ..Payload::of(it, counts.get(&it.item_id).copied().unwrap_or(0.0))
            },
        })
        .collect();
    let index = tandem::index::open(&settings, &settings.data_dir).await?;
    let bar = indicatif::ProgressBar::hidden();
    tandem::index::build_version(
        index.as_ref(),
        "eval",
        model.dim(),
        points.into_iter(),
        &bar,
    )
    .await?;
    let (catalog, _) = Catalog::load(items, index.as_ref(), |_, _| {}).await?;
    let sessions = tandem::session::open(&settings).await?;

    // Known history per scored user, newest first (ties: the later row is newer).
    let mut history: BTreeMap<&UserId, Vec<&Interaction>> = BTreeMap::new();
    for i in &known {
        history.entry(&i.user_id).or_default().push(i);
    }
    let users: Vec<&UserId> = {
        let mut u: Vec<&UserId> = scored.iter().map(|i| &i.user_id).collect();
        u.sort();
        u.dedup();
        u
    };
    for u in &users {
        let mut h: Vec<RecentItem> = history
            .get(u)
            .map(|v| {
                v.iter()
                    .map(|i| RecentItem {
                        item_id: i.item_id.clone(),
                        event_type: i.event_type,
                        timestamp_ms: i.timestamp * 1000,
                    })
                    .collect()
            })
            .unwrap_or_default();
        h.reverse();
        sessions.seed_history(u, &h).await?;
    }
    let (model, catalog) = (
        Arc::new(arc_swap::ArcSwap::from_pointee(model)),
        Arc::new(catalog),
    );
    // One recommender per variant, serving that variant's weights to everyone (as control).
    let recommender = |variant: &str| {
        let mut rerank = settings.rerank.clone();
        let weights = rerank.for_variant(variant).clone();
        rerank.0.insert(CONTROL_VARIANT.to_string(), weights);
        Recommender::new(Parts {
            model: model.clone(),
            index: index.clone(),
            sessions: sessions.clone(),
            catalog: catalog.clone(),
            settings: settings.server.clone(),
            boosts: settings.boosts.clone(),
            experiments: Arc::new(Experiments::new(Vec::new(), sessions.clone(), rerank)),
            arms: Arc::new(tandem::arms::Arms::new(index.clone())),
        })
    };

    std::fs::create_dir_all(&args.out)?;
    for variant in ["off", "on"] {
        let recommender = recommender(variant);
        let path = args.out.join(format!("{variant}.csv"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(out, "user_id,item_id,rank")?;
        let t = std::time::Instant::now();
        for u in &users {
            let exclude: Vec<ItemId> = history
                .get(u)
                .map(|v| v.iter().map(|i| i.item_id.clone()).collect())
                .unwrap_or_default();
            let req = RecommendRequest {
                request_id: String::new(),
                user: Some((*u).clone()),
                session: None,
                k: 20,
                filter: Filter {
                    exclude_items: exclude,
                    ..Filter::default()
                },
                boosts: Vec::new(),
            };
            let recs = recommender.recommend(&req).await;
            for (rank, r) in recs.items.iter().enumerate() {
                writeln!(out, "{},{},{}", u, r.entry.id(), rank + 1)?;
            }
        }
        out.flush()?;
        eprintln!(
            "{variant}: {} users in {:.1}s -> {}",
            users.len(),
            t.elapsed().as_secs_f64(),
            path.display()
        );
    }
    Ok(())
}
