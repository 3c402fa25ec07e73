//! Item attributes through the API (issue 34): attribute filters on every path (trending
//! fallback, personal, cached, similar, trending, onboarding) never return a violating item;
//! `region` and `language` keep items that name the value or none; an undeclared name is 422
//! naming it; boosts (`promoted` within its cap, a variant's own rule) show in `explain`.
//!
//! The catalog is the generator's (300 items; every item has `brand` and `stock`, half name
//! regions, 60% a language, 2% are promoted), served by the embedded index, and by a Qdrant
//! server too when `QDRANT_URL` is set.

mod common;

use common::{qdrant_url, tiny_checkpoints, unique, TestApp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tandem::config::{AdminKey, BoostRule, IndexBackend, SessionBackend, Settings};
use tandem::domain::{keyword_of_request, AttrFilter, AttrValue, Attributes};

const KEY: &str = "attrs-key";

/// Settings over the generated catalog in `data`, with `brand` and `stock` filterable.
fn settings(dir: &Path, data: &Path, model: &Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join("state"),
        model_path: model.to_path_buf(),
        admin_key: AdminKey(Some(KEY.into())),
        ..Settings::default()
    };
    s.server.catalog_dir = data.to_path_buf();
    s.session.backend = SessionBackend::Memory;
    s.index.backend = IndexBackend::Embedded;
    s.catalog.filterable = vec!["brand".into(), "stock".into()];
    s
}

/// The catalog as the server holds it: item id to attributes.
fn catalog_attributes(data: &Path) -> BTreeMap<String, Attributes> {
    tandem::data::format::read_items(&data.join("items.csv"))
        .unwrap()
        .into_iter()
        .map(|i| (i.item_id.to_string(), i.attributes))
        .collect()
}

/// A random attribute filter over the generated attributes, as a query string and as the
/// domain oracle.
fn random_filter(rng: &mut StdRng, brands: &[String]) -> (String, AttrFilter) {
    let mut q: Vec<(String, String)> = Vec::new();
    let mut f = AttrFilter::default();
    if rng.gen_bool(0.5) {
        for _ in 0..rng.gen_range(1..=3) {
            let b = brands[rng.gen_range(0..brands.len())].clone();
            q.push(("attr.brand".into(), b.clone()));
            f.any.entry("brand".into()).or_default().push(b);
        }
    }
    if rng.gen_bool(0.3) {
        let b = brands[rng.gen_range(0..brands.len())].clone();
        q.push(("attr_not.brand".into(), b.clone()));
        f.none.entry("brand".into()).or_default().push(b);
    }
    if rng.gen_bool(0.4) {
        let lo = rng.gen_range(0..150) as f64;
        q.push(("attr_min.stock".into(), lo.to_string()));
        f.min.insert("stock".into(), lo);
    }
    if rng.gen_bool(0.3) {
        let hi = rng.gen_range(20..200) as f64;
        if f.min.get("stock").is_none_or(|lo| *lo <= hi) {
            q.push(("attr_max.stock".into(), hi.to_string()));
            f.max.insert("stock".into(), hi);
        }
    }
    if rng.gen_bool(0.5) {
        let r = ["eu", "us", "uk", "jp", "br"][rng.gen_range(0..5)];
        q.push(("region".into(), r.into()));
        f.any_or_unset.insert("region".into(), vec![r.into()]);
    }
    if rng.gen_bool(0.4) {
        let l = ["en", "de", "fr", "es", "ja"][rng.gen_range(0..5)];
        q.push(("language".into(), l.into()));
        f.any_or_unset.insert("language".into(), vec![l.into()]);
    }
    let query = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    (query, f)
}

fn item_ids(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_string())
        .collect()
}

/// Every returned item passes the filter (judged on the catalog's own attributes, and on the
/// attributes the response shows, which must be the same).
fn assert_all_pass(
    what: &str,
    body: &Value,
    filter: &AttrFilter,
    catalog: &BTreeMap<String, Attributes>,
) -> usize {
    let items = body["items"].as_array().unwrap();
    for item in items {
        let id = item["item_id"].as_str().unwrap();
        let attrs = &catalog[id];
        let shown: Attributes =
            serde_json::from_value(item.get("attributes").cloned().unwrap_or_else(|| json!({})))
                .unwrap();
        assert_eq!(&shown, attrs, "{what}: item {id} shows its attributes");
        assert!(
            filter.matches(attrs),
            "{what}: item {id} with {attrs:?} violates {filter:?}"
        );
    }
    items.len()
}

/// How many catalog items pass the filter (and are available).
fn passing(filter: &AttrFilter, catalog: &BTreeMap<String, Attributes>) -> usize {
    catalog.values().filter(|a| filter.matches(a)).count()
}

async fn filters_hold_on_every_path(app: &TestApp, catalog: &BTreeMap<String, Attributes>) {
    let brands: Vec<String> = catalog
        .values()
        .filter_map(|a| match a.get("brand") {
            Some(AttrValue::Text(b)) => Some(b.to_string()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(brands.len() > 5, "the generator emits brands");
    let anchor = catalog.keys().next().unwrap().clone();
    let mut rng = StdRng::seed_from_u64(34);
    let mut non_empty = 0;
    for case in 0..24 {
        let (query, filter) = random_filter(&mut rng, &brands);
        let user = unique("u");
        // A user with history: the first request is personal, the same again is cached.
        let clicked: Vec<&String> = catalog.keys().skip(case * 7).take(3).collect();
        let events: Vec<Value> = clicked
            .iter()
            .map(|i| json!({"user_id": user, "item_id": i, "type": "click"}))
            .collect();
        let r = app
            .http
            .post(app.url("/v1/events"))
            .json(&Value::Array(events))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let mut sources = BTreeSet::new();
        let paths = [
            format!("/v1/recommendations?k=30&{query}"),
            format!("/v1/recommendations?k=30&user_id={user}&{query}"),
            format!("/v1/recommendations?k=30&user_id={user}&{query}"),
            format!("/v1/items/{anchor}/similar?k=30&{query}"),
            format!("/v1/trending?k=30&{query}"),
        ];
        for path in &paths {
            let (status, body) = app.get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let n = assert_all_pass(path, &body, &filter, catalog);
            if let Some(s) = body["source"].as_str() {
                sources.insert(s.to_string());
            }
            if path.starts_with("/v1/recommendations") && passing(&filter, catalog) >= 40 {
                assert!(n > 0, "{path}: nothing returned though many items pass");
                non_empty += 1;
            }
        }
        assert!(
            sources.contains("trending") && sources.contains("similar"),
            "{sources:?}"
        );
    }
    assert!(non_empty > 10, "too few non-empty answers ({non_empty})");

    // Onboarding answers under its region and language.
    for (region, language) in [("jp", "ja"), ("eu", "de")] {
        let user = unique("onb");
        let r = app
            .http
            .post(app.url(&format!("/v1/users/{user}/onboarding")))
            .json(&json!({"categories": ["Books", "Electronics"], "region": region, "language": language, "k": 30}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        let mut f = AttrFilter::default();
        f.any_or_unset.insert("region".into(), vec![region.into()]);
        f.any_or_unset
            .insert("language".into(), vec![language.into()]);
        let n = assert_all_pass("onboarding", &body["recommendations"], &f, catalog);
        assert!(n > 0, "onboarding returned nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_filters_hold_on_every_path_with_the_embedded_index() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let app = TestApp::spawn(settings(dir.path(), &data, &models[0])).await;
    filters_hold_on_every_path(&app, &catalog_attributes(&data)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_filters_hold_on_every_path_with_a_qdrant_server() {
    let Some(url) = qdrant_url("attribute_filters_hold_on_every_path_with_a_qdrant_server") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let mut s = settings(dir.path(), &data, &models[0]);
    s.index.backend = IndexBackend::Qdrant;
    s.index.qdrant_url = url;
    s.index.collection = unique("tandem_attrs_");
    let app = TestApp::spawn(s).await;
    filters_hold_on_every_path(&app, &catalog_attributes(&data)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_and_language_keep_items_that_name_them_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let catalog = catalog_attributes(&data);
    let app = TestApp::spawn(settings(dir.path(), &data, &models[0])).await;
    let (status, body) = app
        .get("/v1/recommendations?k=200&region=jp&available_only=false")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids = item_ids(&body);
    let (mut named, mut unnamed) = (0, 0);
    for id in &ids {
        match catalog[id].get("region") {
            None => unnamed += 1,
            Some(v) => {
                assert!(v.keywords().contains(&"jp".to_string()), "{id}: {v:?}");
                named += 1;
            }
        }
    }
    assert!(
        named > 0 && unnamed > 0,
        "jp items {named}, region-less {unnamed}"
    );
    // No item naming only other regions.
    let excluded = catalog
        .iter()
        .filter(|(_, a)| {
            a.get("region")
                .is_some_and(|v| !v.keywords().contains(&"jp".to_string()))
        })
        .count();
    assert!(excluded > 0, "the catalog has items sold elsewhere only");
    assert!(ids.len() <= catalog.len() - excluded);

    // A region nobody names keeps exactly the region-less items.
    let (_, body) = app.get("/v1/trending?k=200&region=mars&language=en").await;
    for id in item_ids(&body) {
        assert!(!catalog[&id].contains_key("region"), "{id}");
        assert!(
            catalog[&id]
                .get("language")
                .is_none_or(|l| l == &AttrValue::Text("en".into())),
            "{id}"
        );
    }
    // OpenAPI's deepObject spelling is the same filter.
    let (_, dotted) = app
        .get("/v1/trending?k=50&attr.brand=Aldon&attr_min.stock=20")
        .await;
    let (_, bracketed) = app
        .get("/v1/trending?k=50&attr[brand]=Aldon&attr_min[stock]=20")
        .await;
    assert!(!item_ids(&dotted).is_empty(), "{dotted}");
    assert_eq!(item_ids(&dotted), item_ids(&bracketed));
    // The POST body takes the same filters.
    let r = app
        .http
        .post(app.url("/v1/recommendations"))
        .json(&json!({"k": 50, "region": "eu", "attr": {"brand": ["Aldon"]}, "attr_min": {"stock": 10}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let mut f = AttrFilter::default();
    f.any_or_unset.insert("region".into(), vec!["eu".into()]);
    f.any.insert("brand".into(), vec!["Aldon".into()]);
    f.min.insert("stock".into(), 10.0);
    assert!(assert_all_pass("POST", &body, &f, &catalog) > 0, "{body}");
}

/// Onboarding keeps to the visitor's region and language in what it seeds as history, not
/// only in the page it answers: a seed from another region would be pooled into the user
/// vector of every later request. (Seeds were the categories' most popular items whatever
/// their region.) A variant's boost rules apply to the onboarding page as to any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_seeds_keep_to_the_region_and_the_variant_boosts_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let catalog = catalog_attributes(&data);
    let mut s = settings(dir.path(), &data, &models[0]);
    // Every item is a candidate, and the control variant lifts promoted items far up.
    s.server.k_candidates = 400;
    s.boosts.0.insert(
        "promoted".into(),
        BoostRule::Promoted {
            weight: 50.0,
            cap: 2,
            attribute: "promoted".into(),
        },
    );
    s.rerank
        .0
        .get_mut("control")
        .unwrap()
        .boosts
        .push("promoted".into());
    let app = TestApp::spawn(s).await;
    let categories = ["Books", "Electronics", "Home"];
    let sold_in = |id: &str, region: &str| {
        catalog[id]
            .get("region")
            .is_none_or(|v| v.is_unset() || v.keywords().contains(&region.to_string()))
    };
    for region in ["jp", "br"] {
        let user = unique("onb-seed");
        let r = app
            .http
            .post(app.url(&format!("/v1/users/{user}/onboarding")))
            .json(&json!({"categories": categories, "region": region, "k": 20}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        let seeded: Vec<&str> = body["seeded_items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(!seeded.is_empty(), "{body}");
        for id in &seeded {
            assert!(
                sold_in(id, region),
                "seed {id} is not sold in {region}: {:?}",
                catalog[*id]
            );
        }
    }
    // The variant's rule: the first places go to promoted items (as many as the cap lets).
    let promoted_available = tandem::data::format::read_items(&data.join("items.csv"))
        .unwrap()
        .into_iter()
        .filter(|i| i.available && i.attributes.get("promoted") == Some(&AttrValue::Bool(true)))
        .count();
    assert!(promoted_available >= 2, "the generator promotes 2% of 300");
    let user = unique("onb-boost");
    let r = app
        .http
        .post(app.url(&format!("/v1/users/{user}/onboarding")))
        .json(&json!({"categories": categories, "k": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    let ids = item_ids(&body["recommendations"]);
    for id in &ids[..2] {
        assert_eq!(
            catalog[id].get("promoted"),
            Some(&AttrValue::Bool(true)),
            "{ids:?}"
        );
    }
}

/// A category that the shop has not stocked in the visitor's region still onboards: its items
/// seed the history (they say what the user chose), and the first page keeps to the region.
/// Found by `make fuzz-api`: the seeds' region rule answered 422 "no available item is in any
/// of these categories" for a category that had available items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_a_category_not_stocked_in_the_region_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let app = TestApp::spawn(settings(dir.path(), &data, &models[0])).await;
    let r = app
        .http
        .post(app.url("/v1/items"))
        .header("x-api-key", KEY)
        .json(
            &json!({"items": [{"item_id": "atlas-1", "title": "Sky atlas",
            "categories": ["Atlases"], "attributes": {"region": ["eu"]}}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let user = unique("onb-unstocked");
    let r = app
        .http
        .post(app.url(&format!("/v1/users/{user}/onboarding")))
        .json(&json!({"categories": ["Atlases"], "region": "jp", "k": 10}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["seeded_items"], json!(["atlas-1"]), "{body}");
    for item in body["recommendations"]["items"].as_array().unwrap() {
        assert_ne!(item["item_id"], "atlas-1", "not sold in jp: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_or_malformed_filters_get_422_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let app = TestApp::spawn(settings(dir.path(), &data, &models[0])).await;
    let cases = [
        // `promoted` is stored on items but not declared filterable.
        ("/v1/recommendations?attr.promoted=true", "attr.promoted"),
        ("/v1/recommendations?attr_not.colour=red", "attr_not.colour"),
        ("/v1/items/1/similar?attr_max.margin=3", "attr_max.margin"),
        ("/v1/trending?attr.promoted=true", "attr.promoted"),
        ("/v1/recommendations?attr_min.stock=lots", "attr_min.stock"),
        ("/v1/recommendations?attr.bad-name=x", "attr.bad-name"),
        ("/v1/recommendations?attr.brand=", "attr.brand[0]"),
        ("/v1/recommendations?region=eu&region=us", "region"),
        ("/v1/recommendations?boost=sparkle", "boost[0]"),
        ("/v1/recommendations?attrs.brand=x", "attrs.brand"),
        ("/v1/recommendations?attr[promoted]=true", "attr.promoted"),
    ];
    for (path, field) in cases {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
        assert!(!body["message"].as_str().unwrap_or("").is_empty(), "{body}");
    }
    let r = app
        .http
        .post(app.url("/v1/recommendations"))
        .json(&json!({"attr": {"margin": ["high"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "attr.margin", "{body}");

    // Items: attributes are stored, shown, and checked.
    let post = |body: Value| {
        app.http
            .post(app.url("/v1/items"))
            .header("x-api-key", KEY)
            .json(&body)
            .send()
    };
    let r = post(
        json!({"items": [{"item_id": "new-1", "title": "Νέο προϊόν", "categories": ["Books"],
        "attributes": {"brand": "Zeta", "region": ["jp"], "margin": 0.4, "promoted": true}}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let (status, item) = app.get("/v1/items/new-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        item["attributes"],
        json!({"brand": "Zeta", "region": ["jp"], "margin": 0.4, "promoted": true})
    );
    let (_, body) = app.get("/v1/recommendations?k=200&attr.brand=Zeta").await;
    assert!(item_ids(&body).contains(&"new-1".to_string()), "{body}");
    let r =
        post(json!({"items": [{"item_id": "new-2", "title": "t", "attributes": {"bad name": 1}}]}))
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "items[0].attributes.bad name", "{body}");
    let r = post(
        json!({"items": [{"item_id": "new-3", "title": "t", "attributes": {"size": {"eu": 38}}}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_items_rise_within_the_cap_and_explain_shows_why() {
    let dir = tempfile::tempdir().unwrap();
    let (data, models) = tiny_checkpoints(dir.path(), &["attrs-v1"]);
    let catalog = catalog_attributes(&data);
    let mut s = settings(dir.path(), &data, &models[0]);
    s.boosts.0.insert(
        "promoted".into(),
        BoostRule::Promoted {
            weight: 5.0,
            cap: 2,
            attribute: "promoted".into(),
        },
    );
    // Every item is a candidate, so the promoted ones are among them.
    s.server.k_candidates = 400;
    // The control variant buries low stock on every request.
    s.rerank
        .0
        .get_mut("control")
        .unwrap()
        .boosts
        .push("bury_low_stock".into());
    let app = TestApp::spawn(s).await;
    let promoted: BTreeSet<String> = catalog
        .iter()
        .filter(|(_, a)| a.get("promoted") == Some(&AttrValue::Bool(true)))
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        promoted.len() >= 3,
        "the generator promotes 2%: {promoted:?}"
    );

    let user = unique("boost");
    let clicked: Vec<&String> = catalog.keys().take(5).collect();
    let events: Vec<Value> = clicked
        .iter()
        .map(|i| json!({"user_id": user, "item_id": i, "type": "click"}))
        .collect();
    app.http
        .post(app.url("/v1/events"))
        .json(&Value::Array(events))
        .send()
        .await
        .unwrap();

    let base = format!("/v1/recommendations?k=40&user_id={user}&available_only=false&explain=true");
    let (_, plain) = app.get(&base).await;
    let (_, boosted) = app.get(&format!("{base}&boost=promoted")).await;
    let plain_ids = item_ids(&plain);
    let boosted_ids = item_ids(&boosted);
    let items = boosted["items"].as_array().unwrap();
    let with_boost: Vec<&Value> = items
        .iter()
        .filter(|i| i["explanation"]["boosts"]["promoted"].is_number())
        .collect();
    // Within the cap: exactly two items carry the boost, both promoted, and they lead.
    assert_eq!(with_boost.len(), 2, "{boosted}");
    for i in &with_boost {
        let id = i["item_id"].as_str().unwrap();
        assert!(promoted.contains(id), "{id} is not promoted");
        assert_eq!(i["explanation"]["boosts"]["promoted"], 5.0);
        let rank = boosted_ids.iter().position(|x| x == id).unwrap();
        assert!(rank < 2, "{id} at {rank}");
        // It rose: it was lower, or absent, without the boost.
        let before = plain_ids.iter().position(|x| x == id).unwrap_or(usize::MAX);
        assert!(before >= rank, "{id}: {before} -> {rank}");
    }
    // Promoted items past the cap get nothing.
    let past_cap = items
        .iter()
        .filter(|i| promoted.contains(i["item_id"].as_str().unwrap()))
        .count()
        - 2;
    assert_eq!(
        items
            .iter()
            .filter(|i| i["explanation"]["boosts"].get("promoted").is_some())
            .count(),
        2,
        "{past_cap} promoted items past the cap"
    );
    // The variant's own rule: low stock is buried, and explain says so.
    for resp in [&plain, &boosted] {
        for i in resp["items"].as_array().unwrap() {
            let id = i["item_id"].as_str().unwrap();
            let stock = catalog[id]["stock"].number().unwrap();
            let part = &i["explanation"]["boosts"]["bury_low_stock"];
            if stock < 5.0 {
                assert_eq!(part, &json!(-0.3), "{id} stock {stock}");
            } else {
                assert!(part.is_null(), "{id} stock {stock}: {part}");
            }
        }
    }
    // Request values spell numbers as numbers do.
    assert_eq!(keyword_of_request("42.0"), "42");
}
