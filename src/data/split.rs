//! `tandem split`: the evaluation protocol of DESIGN.md and `../shared/eval/README.md`, so that
//! tandem's own evaluation and the shared scorer see the same files.
//!
//! - Time order per user: timestamp, then item id on ties (the higher id is later; ids compare
//!   as numbers when both are numeric, as the shared split does).
//! - New users: `sha256("newuser-v1:{user_id}")`, first 8 bytes big-endian, `% 10 == 0`. They
//!   are held out of train and test; their first 5 interactions go to `onboard.csv`, the rest
//!   to `onboard_test.csv`. A new user with fewer than 6 interactions has nothing to predict
//!   and is dropped entirely (counted as `new_users_dropped_lt6`).
//! - Every other user with at least 5 interactions keeps the last `max(1, n / 5)` in
//!   `test.csv`, the rest in `train.csv`; users with fewer than 5 are train-only.
//! - `val/` applies the same per-user rule to `train.csv`.
//! - Files are sorted by user id (numeric when all ids are numeric), then time order.
//!
//! The rows are held in memory as interned ids (24 bytes a row), which is fine for MovieLens
//! 25M; a 50M-row generated log needs about 1.5 GB.

use super::format::{find_file, for_each_interaction, for_each_item, DataError, InteractionWriter};
use super::IdMap;
use crate::domain::{EventType, Interaction, ItemId, UserId};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Interactions a user needs to get a test part; fewer and they are train-only.
pub const MIN_TEST_USER_INTERACTIONS: usize = 5;
/// A new user's onboarding rows.
pub const ONBOARD_ROWS: usize = 5;
/// A test item with fewer train rows than this is "cold".
pub const COLD_ITEM_THRESHOLD: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{file}: no interactions to split")]
    NoInteractions { file: PathBuf },
    #[error("{file}: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the protocol holds this user out as a new user.
pub fn is_new_user(user_id: &str) -> bool {
    let digest = Sha256::digest(format!("newuser-v1:{user_id}").as_bytes());
    let head: [u8; 8] = digest[..8].try_into().expect("sha256 has 32 bytes");
    u64::from_be_bytes(head).is_multiple_of(10)
}

/// How many of a main user's `n` interactions (in time order) go to test: the last
/// `max(1, n / 5)`, or none below 5 interactions.
pub fn test_count(n: usize) -> usize {
    if n < MIN_TEST_USER_INTERACTIONS {
        0
    } else {
        (n / 5).max(1)
    }
}

/// Orders ids as the shared split does: numerically when both are integers, else as strings.
/// Integers come before non-integers, which keeps the order total on mixed ids.
pub fn compare_ids(a: &str, b: &str) -> Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// The counts written to `stats.json`; names follow the shared split's `stats.json`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SplitStats {
    pub dataset: String,
    pub catalog_items: u64,
    pub interactions: u64,
    /// Interactions whose item is not in the catalog (kept in the split files).
    pub interactions_item_not_in_catalog: u64,
    pub users: u64,
    pub items_with_interactions: u64,
    pub main_users: u64,
    pub train_only_users: u64,
    pub test_users: u64,
    pub train_rows: u64,
    pub test_rows: u64,
    pub items_in_train: u64,
    pub test_items_not_in_train: u64,
    pub test_rows_item_not_in_train: u64,
    pub test_rows_cold_item: u64,
    pub test_users_with_cold_item: u64,
    pub new_users_held_out: u64,
    pub new_users_scored: u64,
    pub new_users_dropped_lt6: u64,
    /// Rows of the dropped new users, which are in no file.
    pub new_user_rows_dropped: u64,
    pub onboard_rows: u64,
    pub onboard_test_rows: u64,
    pub val_train_rows: u64,
    pub val_test_rows: u64,
    pub val_test_users: u64,
    /// sha256 of each written file, by path relative to the output directory.
    pub sha256: BTreeMap<String, String>,
}

/// One interaction with interned ids.
#[derive(Debug, Clone, Copy)]
struct Row {
    user: u32,
    item: u32,
    rating: f32,
    event: EventType,
    timestamp: i64,
}

struct Interned {
    users: IdMap<UserId>,
    items: IdMap<ItemId>,
    rows: Vec<Row>,
    with_event_type: bool,
}

fn read_rows(file: &Path) -> Result<Interned, DataError> {
    let mut data = Interned {
        users: IdMap::new(),
        items: IdMap::new(),
        rows: Vec::new(),
        with_event_type: false,
    };
    let progress = super::progress_spinner("reading interactions");
    for_each_interaction(file, |i| {
        data.with_event_type |= i.event_type != EventType::Rating;
        let user = data.users.insert(&i.user_id);
        let item = data.items.insert(&i.item_id);
        data.rows.push(Row {
            user,
            item,
            rating: i.rating,
            event: i.event_type,
            timestamp: i.timestamp,
        });
        if data.rows.len().is_multiple_of(65_536) {
            progress.set_position(data.rows.len() as u64);
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    Ok(data)
}

/// Rank of every interned id in [`compare_ids`] order, so that sorting compares integers.
fn order_ranks(keys: &[&str]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_by(|&a, &b| compare_ids(keys[a as usize], keys[b as usize]));
    let mut rank = vec![0u32; keys.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
    rank
}

/// Where the rows of one file go.
struct Sink<'a> {
    data: &'a Interned,
    writer: InteractionWriter,
    file: PathBuf,
    rows: u64,
}

impl<'a> Sink<'a> {
    fn create(data: &'a Interned, file: PathBuf) -> Result<Self, DataError> {
        Ok(Sink {
            data,
            writer: InteractionWriter::create(&file, data.with_event_type)?,
            file,
            rows: 0,
        })
    }

    fn write(&mut self, rows: &[Row]) -> Result<(), DataError> {
        for r in rows {
            self.writer.write(&Interaction {
                user_id: self.data.users.key(r.user).clone(),
                item_id: self.data.items.key(r.item).clone(),
                rating: r.rating,
                timestamp: r.timestamp,
                event_type: r.event,
            })?;
        }
        self.rows += rows.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<(PathBuf, u64), DataError> {
        self.writer.finish()?;
        Ok((self.file, self.rows))
    }
}

/// Splits `data/interactions.{csv,jsonl}` into `out/` and copies the item file; returns the
/// stats also written to `out/stats.json`.
pub fn split(data: &Path, out: &Path) -> Result<SplitStats, SplitError> {
    let interactions_file = find_file(data, "interactions")?;
    let items_file = find_file(data, "items")?;
    let mut stats = SplitStats {
        dataset: data
            .canonicalize()
            .unwrap_or_else(|_| data.to_path_buf())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..SplitStats::default()
    };
    let mut catalog: HashSet<ItemId> = HashSet::new();
    for_each_item(&items_file, |item| {
        catalog.insert(item.item_id);
        Ok(())
    })?;
    stats.catalog_items = catalog.len() as u64;

    let mut data_rows = read_rows(&interactions_file)?;
    if data_rows.rows.is_empty() {
        return Err(SplitError::NoInteractions {
            file: interactions_file,
        });
    }
    stats.interactions = data_rows.rows.len() as u64;
    stats.users = data_rows.users.len() as u64;
    let in_catalog: Vec<bool> = data_rows
        .items
        .keys()
        .iter()
        .map(|i| catalog.contains(i))
        .collect();
    stats.interactions_item_not_in_catalog = data_rows
        .rows
        .iter()
        .filter(|r| !in_catalog[r.item as usize])
        .count() as u64;
    stats.items_with_interactions = in_catalog.iter().filter(|&&c| c).count() as u64;

    // Sort by user, then time order. A stable sort keeps exact duplicates in file order.
    let user_rank = order_ranks(
        &data_rows
            .users
            .keys()
            .iter()
            .map(UserId::as_str)
            .collect::<Vec<_>>(),
    );
    let item_rank = order_ranks(
        &data_rows
            .items
            .keys()
            .iter()
            .map(ItemId::as_str)
            .collect::<Vec<_>>(),
    );
    data_rows.rows.sort_by_key(|r| {
        (
            user_rank[r.user as usize],
            r.timestamp,
            item_rank[r.item as usize],
        )
    });
    let data = &data_rows;
    let new_user: Vec<bool> = data
        .users
        .keys()
        .iter()
        .map(|u| is_new_user(u.as_str()))
        .collect();

    std::fs::create_dir_all(out.join("val")).map_err(|e| SplitError::Write {
        file: out.join("val"),
        source: e,
    })?;
    let mut train = Sink::create(data, out.join("train.csv"))?;
    let mut test = Sink::create(data, out.join("test.csv"))?;
    let mut onboard = Sink::create(data, out.join("onboard.csv"))?;
    let mut onboard_test = Sink::create(data, out.join("onboard_test.csv"))?;
    let mut val_train = Sink::create(data, out.join("val").join("train.csv"))?;
    let mut val_test = Sink::create(data, out.join("val").join("test.csv"))?;

    let mut train_counts: HashMap<u32, u64> = HashMap::new();
    let mut test_rows: Vec<Row> = Vec::new();
    for group in data.rows.chunk_by(|a, b| a.user == b.user) {
        let n = group.len();
        if new_user[group[0].user as usize] {
            stats.new_users_held_out += 1;
            if n <= ONBOARD_ROWS {
                stats.new_users_dropped_lt6 += 1;
                stats.new_user_rows_dropped += n as u64;
            } else {
                stats.new_users_scored += 1;
                onboard.write(&group[..ONBOARD_ROWS])?;
                onboard_test.write(&group[ONBOARD_ROWS..])?;
            }
            continue;
        }
        stats.main_users += 1;
        let k = test_count(n);
        let (train_part, test_part) = group.split_at(n - k);
        if k == 0 {
            stats.train_only_users += 1;
        } else {
            stats.test_users += 1;
        }
        train.write(train_part)?;
        test.write(test_part)?;
        test_rows.extend_from_slice(test_part);
        for r in train_part {
            *train_counts.entry(r.item).or_default() += 1;
        }
        // Validation: the same rule applied to this user's train rows.
        let kv = test_count(train_part.len());
        let (vt, vv) = train_part.split_at(train_part.len() - kv);
        val_train.write(vt)?;
        val_test.write(vv)?;
        if kv > 0 {
            stats.val_test_users += 1;
        }
    }

    stats.items_in_train = train_counts.len() as u64;
    let mut unseen_test_items = HashSet::new();
    let mut cold_users = HashSet::new();
    for r in &test_rows {
        let count = train_counts.get(&r.item).copied().unwrap_or(0);
        if count == 0 {
            stats.test_rows_item_not_in_train += 1;
            unseen_test_items.insert(r.item);
        }
        if count < COLD_ITEM_THRESHOLD {
            stats.test_rows_cold_item += 1;
            cold_users.insert(r.user);
        }
    }
    stats.test_items_not_in_train = unseen_test_items.len() as u64;
    stats.test_users_with_cold_item = cold_users.len() as u64;

    let mut written = Vec::new();
    for (sink, rel) in [
        (train, "train.csv"),
        (test, "test.csv"),
        (onboard, "onboard.csv"),
        (onboard_test, "onboard_test.csv"),
        (val_train, "val/train.csv"),
        (val_test, "val/test.csv"),
    ] {
        let (file, rows) = sink.finish()?;
        match rel {
            "train.csv" => stats.train_rows = rows,
            "test.csv" => stats.test_rows = rows,
            "onboard.csv" => stats.onboard_rows = rows,
            "onboard_test.csv" => stats.onboard_test_rows = rows,
            "val/train.csv" => stats.val_train_rows = rows,
            _ => stats.val_test_rows = rows,
        }
        written.push((rel.to_string(), file));
    }

    let items_name = items_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "items.csv".into());
    let items_out = out.join(&items_name);
    std::fs::copy(&items_file, &items_out).map_err(|e| SplitError::Write {
        file: items_out.clone(),
        source: e,
    })?;
    written.push((items_name, items_out));
    for (rel, file) in written {
        stats.sha256.insert(rel, sha256_file(&file)?);
    }

    let stats_file = out.join("stats.json");
    let json = serde_json::to_string_pretty(&stats).expect("stats serialize");
    std::fs::write(&stats_file, json + "\n").map_err(|e| SplitError::Write {
        file: stats_file,
        source: e,
    })?;
    Ok(stats)
}

fn sha256_file(file: &Path) -> Result<String, SplitError> {
    let mut f = std::fs::File::open(file).map_err(|e| SplitError::Write {
        file: file.to_path_buf(),
        source: e,
    })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(|e| SplitError::Write {
        file: file.to_path_buf(),
        source: e,
    })?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_user_hash_matches_the_shared_split() {
        // The 57 held-out users of ml-latest-small start with these (from onboard.csv).
        assert!(is_new_user("5"));
        assert!(!is_new_user("1"));
        let held_out = (1..=610).filter(|u| is_new_user(&u.to_string())).count();
        assert_eq!(held_out, 57);
    }

    #[test]
    fn test_share_is_a_fifth_with_at_least_one() {
        assert_eq!(test_count(4), 0);
        assert_eq!(test_count(5), 1);
        assert_eq!(test_count(9), 1);
        assert_eq!(test_count(10), 2);
        assert_eq!(test_count(101), 20);
    }

    #[test]
    fn ids_compare_numerically_when_numeric() {
        assert_eq!(compare_ids("9", "10"), Ordering::Less);
        assert_eq!(compare_ids("b", "a"), Ordering::Greater);
        assert_eq!(compare_ids("10", "a"), Ordering::Less);
        assert_eq!(compare_ids("007", "7"), Ordering::Less);
    }
}
