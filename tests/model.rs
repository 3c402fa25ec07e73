//! The two-tower model end to end on a small synthetic catalog with planted structure: every
//! user mostly consumes one category, so a model that learns beats popularity by far.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;
use tandem::domain::{EventType, Interaction, Item, ItemId, UserId};
use tandem::eval::{self, On, Split};
use tandem::model::{train, ModelError, TrainConfig, TwoTower, UserEvent};

const CATEGORIES: usize = 6;
const ITEMS_PER_CATEGORY: usize = 50;
const USERS: usize = 240;
const EVENTS_PER_USER: usize = 24;
const TEST_PER_USER: usize = 4;

fn category_of(item: usize) -> usize {
    item % CATEGORIES
}

fn item(i: usize) -> Item {
    let c = category_of(i);
    let mut it = Item::new(
        ItemId::parse(format!("i{i}")).unwrap(),
        format!("Theme{c} Story {i} ({})", 1960 + 7 * c),
    );
    it.categories = [format!("Cat{c}").into()].into();
    it
}

/// A tiny deterministic generator (xorshift) so the test data needs no files.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A split: each user's last events are the test rows. 85% of a user's events come from
/// their favourite category (skewed to its first items), the rest from anywhere.
fn planted_split(dir: &Path) -> Split {
    let items: Vec<Item> = (0..CATEGORIES * ITEMS_PER_CATEGORY).map(item).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut train = Vec::new();
    let mut test = Vec::new();
    for u in 0..USERS {
        let fav = u % CATEGORIES;
        let mut seen = HashSet::new();
        let mut ts = 1_000_000 + u as i64 * 10_000;
        while seen.len() < EVENTS_PER_USER {
            let i = if rng.below(100) < 85 {
                // min of two draws skews to popular items inside the category
                let k = rng
                    .below(ITEMS_PER_CATEGORY)
                    .min(rng.below(ITEMS_PER_CATEGORY));
                k * CATEGORIES + fav
            } else {
                rng.below(items.len())
            };
            if !seen.insert(i) {
                continue;
            }
            ts += 60;
            let row = Interaction {
                user_id: UserId::parse(format!("{u}")).unwrap(),
                item_id: items[i].item_id.clone(),
                rating: 4.0,
                timestamp: ts,
                event_type: EventType::Rating,
            };
            if seen.len() > EVENTS_PER_USER - TEST_PER_USER {
                test.push(row);
            } else {
                train.push(row);
            }
        }
    }
    Split {
        dir: dir.to_path_buf(),
        on: On::Test,
        items,
        train,
        onboard: Vec::new(),
        test,
        onboard_test: Vec::new(),
    }
}

fn small_config() -> TrainConfig {
    TrainConfig {
        dim: 32,
        input_dim: 32,
        hidden: 64,
        epochs: 12,
        batch_size: 256,
        progress: false,
        seed: 7,
        ..TrainConfig::default()
    }
}

struct Fixture {
    split: Split,
    model: TwoTower,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let split = planted_split(Path::new("planted"));
        let (model, _) =
            train::fit(&small_config(), &split.items, &split.train, None, None).unwrap();
        Fixture { split, model }
    })
}

fn popularity_lists(split: &Split) -> HashMap<UserId, Vec<ItemId>> {
    let mut counts: HashMap<&ItemId, usize> = HashMap::new();
    for r in &split.train {
        *counts.entry(&r.item_id).or_default() += 1;
    }
    let mut ranked: Vec<(&ItemId, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut known: HashMap<&UserId, HashSet<&ItemId>> = HashMap::new();
    for r in &split.train {
        known.entry(&r.user_id).or_default().insert(&r.item_id);
    }
    split
        .scored_users()
        .into_iter()
        .map(|u| {
            let k = &known[&u];
            let list = ranked
                .iter()
                .filter(|(i, _)| !k.contains(i))
                .take(eval::MAX_K)
                .map(|(i, _)| (*i).clone())
                .collect();
            (u, list)
        })
        .collect()
}

#[test]
fn trained_model_beats_popularity_on_held_out_rows() {
    let f = fixture();
    let users = f.split.scored_users();
    assert_eq!(users.len(), USERS);
    let lists = eval::recommend(&f.model, &f.split, &users, eval::MAX_K).unwrap();
    let model = eval::score(&lists, &f.split);
    let pop = eval::score(&popularity_lists(&f.split), &f.split);
    let (m, p) = (model["recall@20"], pop["recall@20"]);
    assert!(
        m > 1.5 * p && m - p > 0.1,
        "model recall@20 {m:.3} should clearly beat popularity {p:.3}"
    );
    assert!(model["ndcg@10"] > pop["ndcg@10"]);
    // Known items are never recommended.
    let known: HashSet<(&UserId, &ItemId)> = f
        .split
        .train
        .iter()
        .map(|r| (&r.user_id, &r.item_id))
        .collect();
    for (u, l) in &lists {
        assert_eq!(l.len(), eval::MAX_K);
        assert!(l.iter().all(|i| !known.contains(&(u, i))));
    }
}

#[test]
fn checkpoint_round_trip_is_bit_identical() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    f.model.save(dir.path()).unwrap();
    let loaded = TwoTower::load(dir.path()).unwrap();
    assert_eq!(loaded.manifest(), f.model.manifest());
    assert_eq!(loaded.version(), f.model.version());
    assert_eq!(loaded.dim(), 32);

    // Featurization is rebuilt from the manifest and the id table alone: same rows for a
    // trained item and for an item never seen.
    let mut fresh = item(3);
    fresh.item_id = ItemId::parse("brand-new").unwrap();
    for it in [&f.split.items[0], &fresh] {
        assert_eq!(
            loaded.featurizer().features(it),
            f.model.featurizer().features(it)
        );
    }

    let mut items = f.split.items.clone();
    items.push(fresh);
    let before = f.model.embed_items(&items).unwrap();
    let after = loaded.embed_items(&items).unwrap();
    assert_eq!(before, after, "item vectors differ after save/load");
    let history: Vec<UserEvent> = items[..5]
        .iter()
        .map(|item| UserEvent {
            item,
            event_type: EventType::Click,
        })
        .collect();
    assert_eq!(
        f.model.embed_user(&history).unwrap(),
        loaded.embed_user(&history).unwrap()
    );
    for v in &after {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "vectors are L2-normalized");
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean similarity of `v` to the trained items of each category.
fn similarity_by_category(f: &Fixture, v: &[f32]) -> Vec<f32> {
    let vecs = f.model.embed_items(&f.split.items).unwrap();
    let mut sums = vec![0.0f32; CATEGORIES];
    for (i, iv) in vecs.iter().enumerate() {
        sums[category_of(i)] += dot(v, iv) / ITEMS_PER_CATEGORY as f32;
    }
    sums
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn cold_items_and_new_users_land_near_their_category() {
    let f = fixture();
    for c in 0..CATEGORIES {
        // A brand-new item: an id never trained, content only.
        let mut it = item(c);
        it.item_id = ItemId::parse(format!("new-{c}")).unwrap();
        it.title = format!("Theme{c} Premiere ({})", 1960 + 7 * c);
        assert_eq!(f.model.popularity(&it), 0.0);
        let v = &f.model.embed_items(std::slice::from_ref(&it)).unwrap()[0];
        assert!(v.iter().all(|x| x.is_finite()));
        let sims = similarity_by_category(f, v);
        assert_eq!(
            argmax(&sims),
            c,
            "new item of Cat{c}: similarities {sims:?}"
        );

        // A user with 3 interactions and no training history.
        let picks: Vec<&Item> = (0..3)
            .map(|k| &f.split.items[(10 + k) * CATEGORIES + c])
            .collect();
        let history: Vec<UserEvent> = picks
            .iter()
            .map(|item| UserEvent {
                item,
                event_type: EventType::Click,
            })
            .collect();
        let u = f.model.embed_user(&history).unwrap();
        let sims = similarity_by_category(f, &u);
        assert_eq!(
            argmax(&sims),
            c,
            "new user of Cat{c}: similarities {sims:?}"
        );
    }
    // An empty history is allowed and gives a usable vector.
    let empty = f.model.embed_user(&[]).unwrap();
    assert_eq!(empty.len(), 32);
    assert!(empty.iter().all(|x| x.is_finite()));
}

/// The default recipe gives an item seen once in training no id row (`min_item_count` 2): a
/// row trained by one example stays near its random start, and on ml-latest-small those items
/// ranked below brand-new ones (BENCHMARKS.md, issue 31, fourth session). Such an item is
/// served its content-only vector, as a brand-new item is; an item seen twice keeps its row.
#[test]
fn an_item_seen_once_is_served_its_content_vector() {
    let f = fixture();
    let mut counts: HashMap<&ItemId, usize> = HashMap::new();
    for r in &f.split.train {
        *counts.entry(&r.item_id).or_default() += 1;
    }
    let with_count = |n: usize| -> Vec<Item> {
        f.split
            .items
            .iter()
            .filter(|it| counts.get(&it.item_id).copied().unwrap_or(0) == n)
            .cloned()
            .collect()
    };
    let (once, twice) = (with_count(1), with_count(2));
    assert!(
        !once.is_empty() && !twice.is_empty(),
        "the planted data has both"
    );
    for (items, has_id_row) in [(&once, false), (&twice, true)] {
        let full = f.model.embed_items(items).unwrap();
        let content = f.model.embed_content(items).unwrap();
        for ((it, v), c) in items.iter().zip(&full).zip(&content) {
            let f_id = f.model.featurizer().features(it).id_row;
            assert_eq!(f_id.is_some(), has_id_row, "{}", it.item_id.as_str());
            if has_id_row {
                assert_ne!(v, c, "{}", it.item_id.as_str());
            } else {
                assert_eq!(v, c, "{} is served its content vector", it.item_id.as_str());
                assert_eq!(f.model.popularity(it), 0.0);
            }
        }
    }
}

fn saved_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fixture().model.save(dir.path()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match TwoTower::load(dir) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_checkpoints_fail_with_errors_that_name_the_problem() {
    // dims mismatch: the manifest says 48, the tensors are 32 wide.
    let dir = saved_checkpoint();
    let mpath = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    std::fs::write(&mpath, text.replace("\"dim\": 32", "\"dim\": 48")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("dims mismatch") && err.contains("item_tower.fc2"),
        "{err}"
    );

    // unknown format version
    std::fs::write(
        &mpath,
        text.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("unknown checkpoint format version 99"),
        "{err}"
    );
    std::fs::write(&mpath, &text).unwrap();

    // missing tensor: rewrite the file without one
    let wpath = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&wpath, &candle_core::Device::Cpu).unwrap();
    tensors.remove("user_tower.fc1.bias");
    candle_core::safetensors::save(&tensors, &wpath).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor `user_tower.fc1.bias`"),
        "{err}"
    );

    // corrupt file: truncated
    let dir = saved_checkpoint();
    let wpath = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&wpath).unwrap();
    std::fs::write(&wpath, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("corrupt or truncated") && err.contains("model.safetensors"),
        "{err}"
    );

    // a missing file is named
    std::fs::remove_file(dir.path().join("manifest.json")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("manifest.json") && err.contains("no such file"),
        "{err}"
    );
    assert!(matches!(
        TwoTower::load(dir.path()),
        Err(ModelError::MissingFile { .. })
    ));
}

/// Writes a split directory the way the shared split is laid out.
fn write_split(split: &Split, dir: &Path) {
    use tandem::data::format::{write_interactions, write_items};
    std::fs::create_dir_all(dir.join("val")).unwrap();
    write_items(&dir.join("items.csv"), &split.items, false).unwrap();
    write_interactions(&dir.join("train.csv"), &split.train, false).unwrap();
    write_interactions(&dir.join("test.csv"), &split.test, false).unwrap();
    // Onboarding: two extra users with 3 known rows each and 3 to predict.
    let mut onboard = Vec::new();
    let mut onboard_test = Vec::new();
    for (n, u) in ["9001", "9002"].iter().enumerate() {
        for k in 0..6 {
            let row = Interaction {
                user_id: UserId::parse(*u).unwrap(),
                item_id: split.items[k * CATEGORIES + n].item_id.clone(),
                rating: 3.0,
                timestamp: 5_000_000 + k as i64,
                event_type: EventType::Rating,
            };
            if k < 3 {
                onboard.push(row);
            } else {
                onboard_test.push(row);
            }
        }
    }
    write_interactions(&dir.join("onboard.csv"), &onboard, false).unwrap();
    write_interactions(&dir.join("onboard_test.csv"), &onboard_test, false).unwrap();
    write_interactions(
        &dir.join("val/train.csv"),
        &split.train[..split.train.len() / 2],
        false,
    )
    .unwrap();
    write_interactions(
        &dir.join("val/test.csv"),
        &split.train[split.train.len() / 2..],
        false,
    )
    .unwrap();
}

#[test]
fn eval_cli_scores_a_checkpoint_and_names_a_missing_split_file() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let split_dir = tmp.path().join("split");
    write_split(&f.split, &split_dir);
    let ckpt = tmp.path().join("ckpt");
    f.model.save(&ckpt).unwrap();
    let recs = tmp.path().join("recs.csv");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (split_arg, ckpt_arg, recs_arg) = (path(&split_dir), path(&ckpt), path(&recs));
    let out = common::tandem_cli(&[
        "eval",
        "--split",
        &split_arg,
        "--model",
        &ckpt_arg,
        "--export-recs",
        &recs_arg,
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI prints the same numbers the library computes.
    let json: std::collections::BTreeMap<String, f64> =
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let split = Split::load(&split_dir, On::Test).unwrap();
    let users = split.scored_users();
    assert_eq!(users.len(), USERS + 2, "test users then new users");
    let lists = eval::recommend(&f.model, &split, &users, eval::MAX_K).unwrap();
    assert_eq!(json, eval::score(&lists, &split));
    assert!(json.contains_key("newuser_recall@20") && json.contains_key("cold_recall@20"));
    let text = std::fs::read_to_string(&recs).unwrap();
    assert_eq!(text.lines().next(), Some("user_id,item_id,rank"));
    assert_eq!(text.lines().count(), 1 + (USERS + 2) * eval::MAX_K);

    std::fs::remove_file(split_dir.join("onboard_test.csv")).unwrap();
    let out = common::tandem_cli(&["eval", "--split", &split_arg, "--model", &ckpt_arg]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("onboard_test.csv") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn metrics_match_the_protocol_on_a_hand_checked_split() {
    // Two users; user 1 has truth {a, b}, user 2 has truth {c} (and c is cold: never trained).
    let mk = |u: &str, i: &str| Interaction {
        user_id: UserId::parse(u).unwrap(),
        item_id: ItemId::parse(i).unwrap(),
        rating: 1.0,
        timestamp: 0,
        event_type: EventType::Rating,
    };
    let items: Vec<Item> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|i| Item::new(ItemId::parse(*i).unwrap(), *i))
        .collect();
    let split = Split {
        dir: "hand".into(),
        on: On::Test,
        items,
        train: vec![mk("1", "d"), mk("2", "e"), mk("2", "a")],
        onboard: vec![],
        test: vec![mk("1", "a"), mk("1", "b"), mk("2", "c")],
        onboard_test: vec![],
    };
    let ids =
        |v: &[&str]| -> Vec<ItemId> { v.iter().map(|s| ItemId::parse(*s).unwrap()).collect() };
    let lists: HashMap<UserId, Vec<ItemId>> = [
        (UserId::parse("1").unwrap(), ids(&["b", "c", "e"])),
        (UserId::parse("2").unwrap(), ids(&["b", "d", "c"])),
    ]
    .into_iter()
    .collect();
    let m = eval::score(&lists, &split);
    // user 1: 1 hit of 2 at rank 1; user 2: 1 hit of 1 at rank 3.
    assert_eq!(m["recall@10"], (0.5 + 1.0) / 2.0);
    assert_eq!(m["mrr@10"], (1.0 + 1.0 / 3.0) / 2.0);
    assert_eq!(m["hitrate@20"], 1.0);
    let n1 = 1.0 / (1.0 + 1.0 / 3f64.log2());
    let n2 = 1.0 / 4f64.log2();
    assert!((m["ndcg@10"] - (n1 + n2) / 2.0).abs() < 1e-15);
    // cold items (< 5 train rows): a, b, c all cold here, so cold recall = recall.
    assert_eq!(m["cold_recall@20"], m["recall@20"]);
    // coverage: {b, c, e, d} of 5 items.
    assert_eq!(m["coverage@10"], 4.0 / 5.0);
}

/// The popularity prior does what the manifest says: with a weight for short histories, a
/// user with few events gets the popular items (the towers order them), and users with long
/// histories are ranked by the towers alone when their weight is zero.
#[test]
fn popularity_prior_pulls_short_histories_toward_popular_items_only() {
    use tandem::model::PopularityPrior;
    let f = fixture();
    let users = f.split.scored_users();
    let ranker = eval::Ranker::new(&f.model, &f.split, &users).unwrap();
    let towers = ranker.top_k(&PopularityPrior::default(), eval::MAX_K);
    let strong = PopularityPrior {
        short_history: usize::MAX, // every user counts as short
        short: 50.0,
        long: 0.0,
        ..PopularityPrior::default()
    };
    let popular = popularity_lists(&f.split);
    let overlap = |lists: &HashMap<UserId, Vec<ItemId>>| -> f64 {
        let mut shared = 0usize;
        for u in &users {
            let p: HashSet<&ItemId> = popular[u].iter().collect();
            shared += lists[u].iter().filter(|i| p.contains(i)).count();
        }
        shared as f64 / (users.len() * eval::MAX_K) as f64
    };
    let with_prior = ranker.top_k(&strong, eval::MAX_K);
    assert!(
        overlap(&with_prior) > 0.8 && overlap(&towers) < 0.5,
        "a strong prior should turn the lists into popular items: overlap {:.2} vs {:.2} for the towers",
        overlap(&with_prior),
        overlap(&towers)
    );
    let long_only = PopularityPrior {
        short_history: 0, // no user is short
        short: 50.0,
        long: 0.0,
        ..PopularityPrior::default()
    };
    assert_eq!(ranker.top_k(&long_only, eval::MAX_K), towers);
}

/// A checkpoint written before `similar` had its own query (no `similar` and no
/// `training.content_loss` in the manifest, no `item_tower.popularity_direction` tensor) still
/// loads, embeds the same vectors and queries `similar` with the anchor's own vector.
#[test]
fn a_checkpoint_from_before_the_similar_query_loads_and_serves() {
    use candle_core::Device;
    use tandem::model::SimilarQuery;
    let f = fixture();
    let dir = saved_checkpoint();
    let mpath = dir.path().join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("similar").is_some());
    assert!(m["training"]
        .as_object_mut()
        .unwrap()
        .remove("content_loss")
        .is_some());
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let wpath = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&wpath, &Device::Cpu).unwrap();
    assert!(tensors.remove("item_tower.popularity_direction").is_some());
    candle_core::safetensors::save(&tensors, &wpath).unwrap();

    let old = TwoTower::load(dir.path()).unwrap();
    assert_eq!(old.popularity_direction(), None);
    assert_eq!(old.manifest().similar, SimilarQuery::default());
    let items = &f.split.items[..12];
    let vectors = old.embed_items(items).unwrap();
    assert_eq!(vectors, f.model.embed_items(items).unwrap());
    for (it, v) in items.iter().zip(&vectors) {
        let q = old.similar_query(it).unwrap();
        assert!(dot(&q, v) > 0.9999, "the query is the anchor's own vector");
    }
}

/// With `popularity_removal = 1` the `similar` query has no component along the popularity
/// direction, and the direction itself is a unit vector that survives a save and load.
#[test]
fn similar_query_takes_out_the_popularity_direction() {
    use tandem::model::SimilarQuery;
    let f = fixture();
    let p = f
        .model
        .popularity_direction()
        .expect("fit sets it")
        .to_vec();
    assert!((dot(&p, &p) - 1.0).abs() < 1e-4);
    let dir = saved_checkpoint();
    assert_eq!(
        TwoTower::load(dir.path()).unwrap().popularity_direction(),
        Some(p.as_slice())
    );
    let mut model = f.model.clone();
    model.manifest_mut().similar = SimilarQuery {
        popularity_removal: 1.0,
        content_weight: 0.0,
    };
    for it in &f.split.items[..20] {
        let q = model.similar_query(it).unwrap();
        assert!(dot(&q, &p).abs() < 1e-4, "q . p = {}", dot(&q, &p));
        assert!((dot(&q, &q) - 1.0).abs() < 1e-4);
    }
}

/// The default `similar` query (the anchor's vector plus its content-only vector) keeps
/// `similar` inside the anchor's category, best-sellers included, and finds a brand-new
/// twin of an item (same title, categories and year, a new id) among that item's nearest
/// neighbours; `tandem eval --similar`'s metrics say so. The content alignment loss places
/// twins by the plain item vectors too.
#[test]
fn similar_keeps_to_the_category_and_finds_content_twins() {
    use tandem::model::SimilarQuery;
    let f = fixture();
    assert_eq!(f.model.manifest().similar.content_weight, 1.0);
    let sim = eval::SimilarConfig {
        twin_k: 5,
        twins: 60,
        ..eval::SimilarConfig::default()
    };
    let shipped = eval::similar_metrics(&f.model, &f.split.items, &f.split.train, &sim).unwrap();
    let mut plain = f.model.clone();
    plain.manifest_mut().similar = SimilarQuery::default();
    let plain = eval::similar_metrics(&plain, &f.split.items, &f.split.train, &sim).unwrap();
    for slice in ["bestsellers", "random"] {
        let key = format!("similar_same_category@10_{slice}");
        assert!(shipped[&key] >= 0.95, "{key}: {shipped:?}");
        assert!(
            shipped[&key] >= plain[&key],
            "{key}: {shipped:?} vs {plain:?}"
        );
    }
    assert!(
        shipped["twin_in_top5"] >= 0.9 && shipped["twin_in_top5"] > plain["twin_in_top5"],
        "twins in their original's 5 nearest: {:.2} by the query, {:.2} by the item vector",
        shipped["twin_in_top5"],
        plain["twin_in_top5"]
    );

    let cfg = TrainConfig {
        content_loss: 1.0,
        ..small_config()
    };
    let (aligned, _) = train::fit(&cfg, &f.split.items, &f.split.train, None, None).unwrap();
    let aligned = eval::similar_metrics(&aligned, &f.split.items, &f.split.train, &sim).unwrap();
    assert!(
        aligned["twin_in_top5_by_item_vector"] >= 0.9
            && aligned["twin_in_top5_by_item_vector"] > shipped["twin_in_top5_by_item_vector"],
        "twins by the item vector: {:.2} with the content loss, {:.2} without",
        aligned["twin_in_top5_by_item_vector"],
        shipped["twin_in_top5_by_item_vector"]
    );
}
