//! The data commands as a user runs them: `tandem import movielens`, `tandem generate` and
//! `tandem split`, through the built binary, checked against what the files must hold.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use tandem::data::format::{ITEM_COLUMNS, ITEM_OPTIONAL_COLUMNS};
use tandem::data::split::{compare_ids, is_new_user};
use tandem::data::{read_interactions, read_items};
use tandem::domain::{EventType, Interaction, Item};

/// A hand-made fixture in a MovieLens layout. The files are stored with a `.fixture` suffix, so
/// that the repository holds no file named like a MovieLens original; a directory is copied
/// into a fresh temp dir under the names the importer expects.
fn fixture(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    if !src.is_dir() {
        return PathBuf::from(format!("{}.fixture", src.display()));
    }
    let dst = std::env::temp_dir().join(format!(
        "tandem-fixture-{}-{}",
        std::process::id(),
        name.replace('/', "-")
    ));
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap();
        let plain = file.strip_suffix(".fixture").unwrap_or(file);
        std::fs::copy(&path, dst.join(plain)).unwrap();
    }
    dst
}

/// The binary with a clean `TANDEM_*` environment (`common::tandem_cli`).
fn tandem(args: &[&str]) -> Output {
    common::tandem_cli(args)
}

fn ok(args: &[&str]) -> String {
    let out = tandem(args);
    assert!(
        out.status.success(),
        "tandem {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn items_by_id(file: &Path) -> HashMap<String, Item> {
    read_items(file)
        .unwrap()
        .into_iter()
        .map(|i| (i.item_id.to_string(), i))
        .collect()
}

#[test]
fn import_ml_latest_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ml");
    let stdout = ok(&[
        "import",
        "movielens",
        "--src",
        p(&fixture("ml-latest-mini")),
        "--out",
        p(&out),
    ]);
    assert!(
        stdout.contains("36 interactions, 7 users, 12 items (11 rated, 4 tagged)"),
        "{stdout}"
    );

    let items = items_by_id(&out.join("items.csv"));
    assert_eq!(items.len(), 12);
    let president = &items["11"];
    assert_eq!(president.title, "American President, The (1995)");
    assert_eq!(president.categories[..], ["Comedy", "Drama", "Romance"]);
    assert_eq!(president.year, Some(1995));
    let city = &items["29"];
    assert_eq!(
        city.title,
        "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
    );
    assert_eq!(city.year, Some(1995));
    // Tags: lowercased, trimmed, deduplicated, commas kept inside one tag.
    assert_eq!(
        items["260"].tags[..],
        ["classic", "sci-fi", "space, the final frontier"]
    );
    assert_eq!(items["1"].tags[..], ["pixar", "fun"]);
    assert!(items["2"].tags.is_empty());
    // "(no genres listed)" is no category; the year still comes from the title.
    assert!(items["114335"].categories.is_empty());
    assert_eq!(items["114335"].year, Some(1957));
    assert_eq!(items["114335"].tags[..], ["french"]);
    assert_eq!(items["171749"].year, Some(2006));
    assert_eq!(items["40697"].year, None);
    assert_eq!(items["147250"].year, None);
    // MovieLens' trailing blank is kept, as in the shared split's items.csv.
    assert_eq!(
        items["27008"].title,
        "From Dusk Till Dawn 2: Texas Blood Money (1999) "
    );
    assert_eq!(items["27008"].year, Some(1999));
    assert_eq!(
        items["260"].categories[..],
        ["Action", "Adventure", "Sci-Fi"]
    );

    let rows = read_interactions(&out.join("interactions.csv")).unwrap();
    assert_eq!(rows.len(), 36);
    assert_eq!(rows[2].user_id.as_str(), "1");
    assert_eq!(rows[2].item_id.as_str(), "11");
    assert_eq!(rows[2].rating, 4.5);
    assert_eq!(rows[2].timestamp, 964982224);
    assert!(rows.iter().all(|r| r.event_type == EventType::Rating));
    let users: HashSet<_> = rows.iter().map(|r| r.user_id.clone()).collect();
    assert_eq!(users.len(), 7);
}

#[test]
fn import_ml_100k_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ml");
    let stdout = ok(&[
        "import",
        "movielens",
        "--src",
        p(&fixture("ml-100k-mini")),
        "--out",
        p(&out),
    ]);
    assert!(
        stdout.contains("20 interactions, 5 users, 8 items (8 rated, 0 tagged)"),
        "{stdout}"
    );
    let items = items_by_id(&out.join("items.csv"));
    // u.item is latin-1: é is one byte there and must come out as UTF-8.
    assert_eq!(items["4"].title, "Misérables, Les (1995)");
    assert_eq!(items["4"].categories[..], ["Drama", "Musical"]);
    assert_eq!(
        items["1"].categories[..],
        ["Animation", "Children's", "Comedy"]
    );
    assert_eq!(items["1"].year, Some(1995));
    // No year in the title: the release date gives it.
    assert_eq!(items["6"].title, "Café au Lait");
    assert_eq!(items["6"].year, Some(1994));
    // The `unknown` genre flag means no category.
    assert!(items["267"].categories.is_empty());
    assert_eq!(items["267"].year, None);
    let rows = read_interactions(&out.join("interactions.csv")).unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(rows[0].user_id.as_str(), "1");
    assert_eq!(rows[0].rating, 5.0);
    assert_eq!(rows[0].timestamp, 874965758);
}

fn generate(out: &Path, items: u64, users: u64, interactions: u64, seed: u64) -> String {
    ok(&[
        "generate",
        "--out",
        p(out),
        "--items",
        &items.to_string(),
        "--users",
        &users.to_string(),
        "--interactions",
        &interactions.to_string(),
        "--seed",
        &seed.to_string(),
    ])
}

#[test]
fn generate_is_deterministic_sized_and_structured() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    generate(&a, 5000, 3000, 30_000, 7);
    generate(&b, 5000, 3000, 30_000, 7);
    generate(&c, 5000, 3000, 30_000, 8);
    for f in ["items.csv", "interactions.csv", "generate.json"] {
        let (x, y, z) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            std::fs::read(c.join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between two runs with the same seed");
        assert!(x != z, "{f} is the same for seeds 7 and 8");
    }

    let items = read_items(&a.join("items.csv")).unwrap();
    let rows = read_interactions(&a.join("interactions.csv")).unwrap();
    assert_eq!(items.len(), 5000);
    assert_eq!(rows.len(), 30_000);
    let users: HashSet<_> = rows.iter().map(|r| r.user_id.as_str()).collect();
    assert_eq!(users.len(), 3000, "every user has at least one interaction");
    // The catalog has the optional columns a storefront uses.
    assert!(items.iter().all(|i| i.price.is_some_and(|p| p > 0.0)));
    assert!(items
        .iter()
        .all(|i| !i.categories.is_empty() && !i.tags.is_empty()));
    assert!(items.iter().any(|i| !i.available));
    assert!(items.iter().all(|i| i.created_at.is_some()));
    let kinds: HashSet<_> = rows.iter().map(|r| r.event_type).collect();
    for k in [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
        EventType::Rating,
    ] {
        assert!(kinds.contains(&k), "no {k} events");
    }

    // Sorted by user (numerically), then time; an item is never used before it exists.
    let created: HashMap<&str, i64> = items
        .iter()
        .map(|i| (i.item_id.as_str(), i.created_at.unwrap()))
        .collect();
    for w in rows.windows(2) {
        let order = compare_ids(w[0].user_id.as_str(), w[1].user_id.as_str());
        assert!(order.is_le(), "users out of order: {:?} {:?}", w[0], w[1]);
        if order.is_eq() {
            assert!(w[0].timestamp < w[1].timestamp, "time out of order: {w:?}");
        }
    }
    assert!(rows
        .iter()
        .all(|r| created[r.item_id.as_str()] <= r.timestamp));

    // Popularity is skewed: the top 1% of items take a large share of the interactions.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *counts.entry(r.item_id.as_str()).or_default() += 1;
    }
    let mut sorted: Vec<usize> = counts.values().copied().collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    // (Uniform popularity would give them about 1%.)
    let top: usize = sorted.iter().take(50).sum();
    let share = top as f64 / rows.len() as f64;
    assert!(
        share > 0.12,
        "top 1% of items have only {share:.3} of interactions"
    );

    // Users concentrate on a few categories: their top 3 categories hold most of their rows,
    // far more than the catalog's 3 largest categories hold of it.
    let genre: HashMap<&str, &str> = items
        .iter()
        .map(|i| (i.item_id.as_str(), i.categories[0].as_str()))
        .collect();
    let mut per_user: HashMap<&str, HashMap<&str, usize>> = HashMap::new();
    for r in &rows {
        *per_user
            .entry(r.user_id.as_str())
            .or_default()
            .entry(genre[r.item_id.as_str()])
            .or_default() += 1;
    }
    let top3 = |m: &HashMap<&str, usize>| {
        let mut v: Vec<usize> = m.values().copied().collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.iter().take(3).sum::<usize>() as f64 / v.iter().sum::<usize>() as f64
    };
    let active: Vec<f64> = per_user
        .values()
        .filter(|m| m.values().sum::<usize>() >= 20)
        .map(top3)
        .collect();
    assert!(active.len() > 50);
    let mean = active.iter().sum::<f64>() / active.len() as f64;
    let mut catalog_genres: HashMap<&str, usize> = HashMap::new();
    for g in genre.values() {
        *catalog_genres.entry(g).or_default() += 1;
    }
    let baseline = top3(&catalog_genres);
    assert!(
        mean > 0.85 && mean > baseline + 0.3,
        "users' top-3 category share {mean:.3}, catalog's {baseline:.3}"
    );
}

/// Reads a split file into rows.
fn rows_of(file: &Path) -> Vec<Interaction> {
    read_interactions(file).unwrap()
}

fn key(r: &Interaction) -> (String, String, i64, String) {
    (
        r.user_id.to_string(),
        r.item_id.to_string(),
        r.timestamp,
        format!("{}:{}", r.rating, r.event_type),
    )
}

fn by_user(rows: &[Interaction]) -> BTreeMap<String, Vec<Interaction>> {
    let mut m: BTreeMap<String, Vec<Interaction>> = BTreeMap::new();
    for r in rows {
        m.entry(r.user_id.to_string()).or_default().push(r.clone());
    }
    m
}

/// The protocol, written out plainly as the oracle: time order with the numeric item id as
/// tie-break, then the last max(1, n/5) of users with at least 5 rows.
fn time_ordered(mut rows: Vec<Interaction>) -> Vec<Interaction> {
    rows.sort_by(|a, b| {
        a.timestamp
            .cmp(&b.timestamp)
            .then_with(|| compare_ids(a.item_id.as_str(), b.item_id.as_str()))
    });
    rows
}

fn check_holdout(all: &[Interaction], train: &[Interaction], test: &[Interaction]) {
    let (train, test) = (by_user(train), by_user(test));
    for (user, rows) in by_user(all) {
        let rows = time_ordered(rows);
        let n = rows.len();
        let k = if n >= 5 { (n / 5).max(1) } else { 0 };
        let want_train: Vec<_> = rows[..n - k].iter().map(key).collect();
        let want_test: Vec<_> = rows[n - k..].iter().map(key).collect();
        let got_train: Vec<_> = train
            .get(&user)
            .map(|v| v.iter().map(key).collect())
            .unwrap_or_default();
        let got_test: Vec<_> = test
            .get(&user)
            .map(|v| v.iter().map(key).collect())
            .unwrap_or_default();
        assert_eq!(got_train, want_train, "train rows of user {user}");
        assert_eq!(got_test, want_test, "test rows of user {user}");
    }
}

#[test]
fn split_follows_the_protocol_on_generated_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("split");
    generate(&data, 500, 400, 8_000, 11);
    let stdout = ok(&["split", "--data", p(&data), "--out", p(&out)]);
    assert!(stdout.contains("split 8,000 interactions"), "{stdout}");

    let all = rows_of(&data.join("interactions.csv"));
    let train = rows_of(&out.join("train.csv"));
    let test = rows_of(&out.join("test.csv"));
    let onboard = rows_of(&out.join("onboard.csv"));
    let onboard_test = rows_of(&out.join("onboard_test.csv"));
    // The generated event types survive the split.
    assert!(train.iter().any(|r| r.event_type == EventType::Purchase));

    // New users are exactly those the hash picks; they are in no train or test row.
    let users: HashSet<String> = all.iter().map(|r| r.user_id.to_string()).collect();
    let new: HashSet<String> = users.iter().filter(|u| is_new_user(u)).cloned().collect();
    assert!(
        new.len() > 20 && new.len() < 70,
        "{} new users of 400",
        new.len()
    );
    assert!(train
        .iter()
        .chain(&test)
        .all(|r| !new.contains(r.user_id.as_str())));
    assert!(onboard
        .iter()
        .chain(&onboard_test)
        .all(|r| new.contains(r.user_id.as_str())));

    // Onboarding: the first 5 in time order, the rest to predict; users with fewer than 6
    // interactions are dropped.
    let all_new: Vec<Interaction> = all
        .iter()
        .filter(|r| new.contains(r.user_id.as_str()))
        .cloned()
        .collect();
    let (ob, obt) = (by_user(&onboard), by_user(&onboard_test));
    let mut dropped_rows = 0;
    for (user, rows) in by_user(&all_new) {
        let rows = time_ordered(rows);
        if rows.len() < 6 {
            assert!(!ob.contains_key(&user) && !obt.contains_key(&user));
            dropped_rows += rows.len();
            continue;
        }
        let got: Vec<_> = ob[&user].iter().map(key).collect();
        assert_eq!(got.len(), 5, "onboard rows of user {user}");
        assert_eq!(got, rows[..5].iter().map(key).collect::<Vec<_>>());
        let got: Vec<_> = obt[&user].iter().map(key).collect();
        assert_eq!(got, rows[5..].iter().map(key).collect::<Vec<_>>());
    }

    // Main users: test is their last 20% in time order.
    let main: Vec<Interaction> = all
        .iter()
        .filter(|r| !new.contains(r.user_id.as_str()))
        .cloned()
        .collect();
    check_holdout(&main, &train, &test);
    // Validation: the same rule on train.
    check_holdout(
        &train,
        &rows_of(&out.join("val/train.csv")),
        &rows_of(&out.join("val/test.csv")),
    );

    // No row lost or duplicated.
    let mut union: Vec<_> = train
        .iter()
        .chain(&test)
        .chain(&onboard)
        .chain(&onboard_test)
        .map(key)
        .collect();
    let new_rows = by_user(&all_new);
    let mut want: Vec<_> = all
        .iter()
        .filter(|r| !new.contains(r.user_id.as_str()) || new_rows[r.user_id.as_str()].len() >= 6)
        .map(key)
        .collect();
    union.sort();
    want.sort();
    assert_eq!(union.len() + dropped_rows, all.len());
    assert_eq!(union, want);

    // stats.json tells the same story.
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["interactions"], 8000);
    assert_eq!(stats["train_rows"], train.len());
    assert_eq!(stats["test_rows"], test.len());
    assert_eq!(stats["onboard_rows"], onboard.len());
    assert_eq!(stats["new_users_held_out"], new.len());
    assert_eq!(stats["new_user_rows_dropped"], dropped_rows);
    assert_eq!(
        std::fs::read(out.join("items.csv")).unwrap(),
        std::fs::read(data.join("items.csv")).unwrap()
    );
}

#[test]
fn split_breaks_time_ties_by_numeric_item_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("items.csv"),
        "item_id,title,genres\n9,a,\n10,b,\n100,c,\n1,d,\n2,e,\n",
    )
    .unwrap();
    // User 1 (not a new user) has 5 rows, 3 at the same second: "100" is the latest, then
    // "10", then "9", though as strings "9" would sort last.
    assert!(!is_new_user("1"));
    std::fs::write(
        data.join("interactions.csv"),
        "user_id,item_id,rating,timestamp\n1,100,4.0,50\n1,9,3.0,50\n1,1,5.0,10\n1,10,2.5,50\n1,2,1.0,20\n",
    )
    .unwrap();
    let out = dir.path().join("split");
    ok(&["split", "--data", p(&data), "--out", p(&out)]);
    assert_eq!(
        std::fs::read_to_string(out.join("train.csv")).unwrap(),
        "user_id,item_id,rating,timestamp\n1,1,5.0,10\n1,2,1.0,20\n1,9,3.0,50\n1,10,2.5,50\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("test.csv")).unwrap(),
        "user_id,item_id,rating,timestamp\n1,100,4.0,50\n"
    );
}

/// A model that learns the planted category tastes must beat popularity clearly. The simplest
/// such model (popularity within the categories of the user's train rows) stands in for it.
#[test]
fn generated_tastes_are_learnable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("split");
    generate(&data, 3000, 600, 30_000, 5);
    ok(&["split", "--data", p(&data), "--out", p(&out)]);
    let items = read_items(&out.join("items.csv")).unwrap();
    let train = rows_of(&out.join("train.csv"));
    let test = by_user(&rows_of(&out.join("test.csv")));
    let category: HashMap<&str, &str> = items
        .iter()
        .map(|i| (i.item_id.as_str(), i.categories[0].as_str()))
        .collect();
    let mut pop: HashMap<&str, f64> = HashMap::new();
    for r in &train {
        *pop.entry(r.item_id.as_str()).or_default() += 1.0;
    }
    let history = by_user(&train);
    let (mut recall_pop, mut recall_cat) = (0.0, 0.0);
    for (user, truth) in &test {
        let known: HashSet<&str> = history[user].iter().map(|r| r.item_id.as_str()).collect();
        let mut taste: HashMap<&str, f64> = HashMap::new();
        for r in &history[user] {
            *taste.entry(category[r.item_id.as_str()]).or_default() += 1.0;
        }
        let truth: HashSet<&str> = truth.iter().map(|r| r.item_id.as_str()).collect();
        let recall = |score: &dyn Fn(&str) -> f64| {
            let mut cands: Vec<(&str, f64)> = pop
                .keys()
                .filter(|i| !known.contains(*i))
                .map(|&i| (i, score(i)))
                .collect();
            cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
            let hits = cands
                .iter()
                .take(20)
                .filter(|c| truth.contains(c.0))
                .count();
            hits as f64 / truth.len().min(20) as f64
        };
        recall_pop += recall(&|i: &str| pop[i]);
        recall_cat +=
            recall(&|i: &str| pop[i] * (0.05 + taste.get(category[i]).copied().unwrap_or(0.0)));
    }
    let n = test.len() as f64;
    let (recall_pop, recall_cat) = (recall_pop / n, recall_cat / n);
    assert!(
        recall_cat > 1.5 * recall_pop && recall_cat > recall_pop + 0.05,
        "taste-aware R@20 {recall_cat:.4} vs popularity {recall_pop:.4}"
    );
}

/// Writes a data dir with a valid items.csv and the given interactions.csv, runs split on it
/// and returns stderr, asserting a non-zero exit and a single clear line.
fn split_error(name: &str, interactions: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(name);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("items.csv"),
        "item_id,title,genres\n1,a,X\n2,b,Y\n",
    )
    .unwrap();
    std::fs::write(data.join("interactions.csv"), interactions).unwrap();
    let out = tandem(&[
        "split",
        "--data",
        p(&data),
        "--out",
        p(&dir.path().join("out")),
    ]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{name}: accepted");
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
    assert!(stderr.starts_with("error: "), "{name}: {stderr}");
    assert!(stderr.contains("interactions.csv"), "{name}: {stderr}");
    stderr
}

#[test]
fn bad_input_is_rejected_with_file_line_and_field() {
    let e = split_error("missing", "user_id,item_id,timestamp\n1,2,3\n");
    assert!(
        e.contains("interactions.csv:1: missing column `rating`"),
        "{e}"
    );

    let e = split_error(
        "rating",
        "user_id,item_id,rating,timestamp\n1,1,4.0,5\n1,2,good,6\n",
    );
    assert!(
        e.contains("interactions.csv:3: field `rating`: \"good\" is not a number"),
        "{e}"
    );

    let e = split_error(
        "dup",
        "user_id,item_id,rating,rating,timestamp\n1,2,3,4,5\n",
    );
    assert!(
        e.contains("interactions.csv:1: duplicate column `rating`"),
        "{e}"
    );

    let e = split_error("tabs", "user_id\titem_id\trating\ttimestamp\n1\t2\t3\t4\n");
    assert!(
        e.contains("interactions.csv:1: the header is tab-separated"),
        "{e}"
    );

    let e = split_error("semicolons", "user_id;item_id;rating;timestamp\n1;2;3;4\n");
    assert!(
        e.contains("interactions.csv:1: the header is semicolon-separated"),
        "{e}"
    );

    let e = split_error("empty", "");
    assert!(e.contains("interactions.csv: the file is empty"), "{e}");

    let e = split_error("header-only", "user_id,item_id,rating,timestamp\n");
    assert!(e.contains("no interactions"), "{e}");

    let e = split_error(
        "timestamp",
        "user_id,item_id,rating,timestamp\n1,2,3.0,yesterday\n",
    );
    assert!(e.contains("interactions.csv:2: field `timestamp`"), "{e}");

    // The same for the raw MovieLens files on import.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ml");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(fixture("ml-latest-mini/movies.csv"), src.join("movies.csv")).unwrap();
    std::fs::write(
        src.join("ratings.csv"),
        "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,four,11\n",
    )
    .unwrap();
    let out = tandem(&[
        "import",
        "movielens",
        "--src",
        p(&src),
        "--out",
        p(&dir.path().join("o")),
    ]);
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        e.contains("ratings.csv:3: field `rating`: \"four\" is not a number"),
        "{e}"
    );

    std::fs::remove_file(src.join("ratings.csv")).unwrap();
    let out = tandem(&[
        "import",
        "movielens",
        "--src",
        p(&src),
        "--out",
        p(&dir.path().join("o")),
    ]);
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(e.contains("not a MovieLens directory"), "{e}");

    // Generator arguments are checked too.
    let out = tandem(&[
        "generate",
        "--out",
        p(&dir.path().join("g")),
        "--users",
        "10",
        "--interactions",
        "5",
    ]);
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success());
    assert!(
        e.contains("--interactions: 5 is fewer than --users 10"),
        "{e}"
    );
}

#[test]
fn every_command_has_help() {
    let top = ok(&["--help"]);
    for cmd in ["import", "generate", "split"] {
        assert!(top.contains(cmd), "{top}");
    }
    let gen = ok(&["generate", "--help"]);
    for flag in [
        "--out",
        "--items",
        "--users",
        "--interactions",
        "--seed",
        "--config",
    ] {
        assert!(gen.contains(flag), "{gen}");
    }
    assert!(ok(&["import", "movielens", "--help"]).contains("ml-100k"));
    assert!(ok(&["split", "--help"]).contains("--data"));
}

/// The JSON Schemas describe what the readers accept: the same columns, the same event types.
#[test]
fn schemas_match_the_readers() {
    let load = |name: &str| -> serde_json::Value {
        let f = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap()
    };
    let items = load("items.schema.json");
    let required: Vec<&str> = items["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ITEM_COLUMNS);
    let props: HashSet<&str> = items["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let columns: HashSet<&str> = ITEM_COLUMNS
        .iter()
        .chain(ITEM_OPTIONAL_COLUMNS)
        .copied()
        .collect();
    assert_eq!(props, columns);

    let inter = load("interactions.schema.json");
    let events: Vec<&str> = inter["properties"]["event_type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(events, EventType::ALL.map(|e| e.as_str()));
    let required: Vec<&str> = inter["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, tandem::data::format::INTERACTION_COLUMNS);
}

#[test]
fn index_command_builds_a_live_collection_and_a_failure_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(&data, 300, 50, 2_000, 3);
    let state = dir.path().join("state");
    let cfg = dir.path().join("tandem.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\n", p(&state))).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
    let out = ok(&[
        "--config",
        p(&cfg),
        "index",
        "--model",
        p(&model),
        "--data",
        p(&data),
    ]);
    assert!(out.contains("indexed 300 items"), "{out}");
    let current = state.join("index/CURRENT");
    let live = std::fs::read_to_string(&current).expect("a live collection version");

    // A directory that is not a checkpoint: a clear error, and the live version is unchanged.
    let out = tandem(&[
        "--config",
        p(&cfg),
        "index",
        "--model",
        p(&data),
        "--data",
        p(&data),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("manifest.json"), "{err}");
    assert_eq!(std::fs::read_to_string(&current).unwrap(), live);
}
