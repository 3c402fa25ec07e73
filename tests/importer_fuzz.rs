//! Importer fuzzing: no input file makes the catalog and interaction readers panic
//! (proptest); each one is read or fails with an error that names the file.

mod common;

use common::nasty_field;
use proptest::prelude::*;
use std::path::Path;
use tandem::data::format::{read_interactions, read_items};

const ITEM_COLUMNS: [&str; 8] = [
    "item_id",
    "title",
    "genres",
    "tags",
    "price",
    "available",
    "year",
    "created_at",
];
const INTERACTION_COLUMNS: [&str; 5] = ["user_id", "item_id", "rating", "timestamp", "event_type"];

/// A CSV with a header made of a random subset (in random order, maybe duplicated) of the
/// known columns plus junk, and rows of nasty fields, sometimes of the wrong width.
fn csv_file(columns: &'static [&'static str]) -> impl Strategy<Value = String> {
    let header = prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(columns).prop_map(str::to_string),
            1 => "[a-z_]{1,8}",
        ],
        0..=columns.len() + 1,
    );
    let rows = prop::collection::vec(prop::collection::vec(nasty_field(), 0..10), 0..6);
    (header, rows).prop_map(|(header, rows)| {
        let mut w = csv::WriterBuilder::new().flexible(true).from_writer(vec![]);
        w.write_record(&header).unwrap();
        for r in rows {
            w.write_record(&r).unwrap();
        }
        String::from_utf8(w.into_inner().unwrap()).unwrap()
    })
}

/// JSONL lines: objects with the known keys holding values of any JSON type, or not JSON.
fn jsonl_file(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| n.into()),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        nasty_field().prop_map(serde_json::Value::String),
        prop::collection::vec(nasty_field(), 0..3).prop_map(|v| serde_json::json!(v)),
        Just(serde_json::json!({"nested": [1, {"a": null}]})),
    ];
    let object = prop::collection::btree_map(prop::sample::select(keys), value, 0..keys.len())
        .prop_map(|m| serde_json::to_string(&m).unwrap());
    let line = prop_oneof![
        6 => object,
        1 => "[ -~]{0,20}",
        1 => Just("{\"item_id\": ".to_string()),
        1 => Just(String::new()),
    ];
    prop::collection::vec(line, 0..6).prop_map(|lines| lines.join("\n"))
}

fn read_both(dir: &Path, name: &str, content: &[u8]) {
    let file = dir.join(name);
    std::fs::write(&file, content).unwrap();
    // Either result is fine; a panic fails the test. An error must name the file.
    if let Err(e) = read_items(&file) {
        assert!(e.to_string().contains(name), "{e}");
    }
    if let Err(e) = read_interactions(&file) {
        assert!(e.to_string().contains(name), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn importers_never_panic_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        read_both(dir.path(), "f.csv", &bytes);
        read_both(dir.path(), "f.jsonl", &bytes);
    }

    #[test]
    fn item_csv_with_nasty_fields_never_panics(text in csv_file(&ITEM_COLUMNS)) {
        let dir = tempfile::tempdir().unwrap();
        read_both(dir.path(), "items.csv", text.as_bytes());
    }

    #[test]
    fn interaction_csv_with_nasty_fields_never_panics(text in csv_file(&INTERACTION_COLUMNS)) {
        let dir = tempfile::tempdir().unwrap();
        read_both(dir.path(), "interactions.csv", text.as_bytes());
    }

    #[test]
    fn jsonl_with_any_json_values_never_panics(
        items in jsonl_file(&ITEM_COLUMNS),
        interactions in jsonl_file(&INTERACTION_COLUMNS),
    ) {
        let dir = tempfile::tempdir().unwrap();
        read_both(dir.path(), "items.jsonl", items.as_bytes());
        read_both(dir.path(), "interactions.jsonl", interactions.as_bytes());
    }
}

/// The one valid row per file is read back: the generators above reach the success path too,
/// not only errors.
#[test]
fn a_valid_file_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.csv");
    std::fs::write(
        &items,
        "item_id,title,genres,price\ni1,Blue mug,kitchen|gifts,9.5\n",
    )
    .unwrap();
    let read = read_items(&items).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].item_id.as_str(), "i1");
    let inter = dir.path().join("interactions.jsonl");
    std::fs::write(
        &inter,
        r#"{"user_id":"u1","item_id":"i1","rating":4.0,"timestamp":1700000000}"#,
    )
    .unwrap();
    assert_eq!(read_interactions(&inter).unwrap().len(), 1);
}
