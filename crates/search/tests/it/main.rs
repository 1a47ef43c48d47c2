//! The search index on real tantivy folders: what matches (typos, prefixes,
//! accents, other scripts), ranking, filters, facets, highlights, and that an
//! index built in one pass equals one built event by event, also across a
//! reopen. `projection`: the follower on a real log (rebuild, missing, foreign
//! and unreadable index folders).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod projection;

use scaleshop_contracts::Contract;
use scaleshop_contracts::catalog::{ProductCreated, ProductUpdated};
use scaleshop_contracts::inventory::{InventoryAdjusted, InventoryReserved, StockLine};
use scaleshop_events::{Event, NewEvent};
use scaleshop_search::index::Generation;
use scaleshop_search::{SearchQuery, Sort};
use uuid::Uuid;

struct Log {
    events: Vec<Event>,
}

impl Log {
    fn new() -> Self {
        Self { events: Vec::new() }
    }

    fn push<C: Contract>(&mut self, aggregate: Uuid, payload: &C) {
        let new = NewEvent::typed(aggregate, payload).unwrap();
        let sequence = self.events.len() as i64 + 1;
        self.events.push(Event {
            id: new.id,
            sequence,
            kind: new.kind.to_owned(),
            version: new.version as i32,
            aggregate_id: aggregate,
            occurred_at: new.occurred_at + chrono::Duration::microseconds(sequence),
            data: sqlx_json(new.data),
            traceparent: None,
        });
    }

    fn product(&mut self, name: &str, description: &str, price_cents: i64, stock: i64) -> Uuid {
        let id = Uuid::now_v7();
        let n = self.events.len();
        self.push(
            id,
            &ProductCreated {
                product_id: id,
                sku: format!("SKU-{n}"),
                name: name.into(),
                price_cents,
                currency: "EUR".into(),
                initial_stock: stock,
                description: Some(description.into()),
                at: None,
            },
        );
        id
    }
}

fn sqlx_json(value: serde_json::Value) -> scaleshop_db::sqlx::types::Json<serde_json::Value> {
    scaleshop_db::sqlx::types::Json(value)
}

fn query(text: &str) -> SearchQuery {
    SearchQuery {
        text: Some(text.into()),
        limit: 50,
        ..SearchQuery::default()
    }
}

fn ids(index: &Generation, q: &SearchQuery) -> Vec<Uuid> {
    index
        .search(q)
        .unwrap()
        .hits
        .into_iter()
        .map(|h| h.id)
        .collect()
}

fn catalog() -> (Log, Vec<Uuid>) {
    let mut log = Log::new();
    let products = vec![
        log.product("Blue ceramic mug", "Holds coffee and tea", 1_250, 10),
        log.product("Espresso cup", "A small mug for espresso", 800, 0),
        log.product("Crème brûlée torch", "Dessert à la française", 4_500, 3),
        log.product("Keyboard", "Mechanical, with blue switches", 12_000, 5),
        log.product("Чайник электрический", "Кухонный прибор", 6_000, 2),
        log.product("Mug rack", "Wooden rack for mugs", 2_000, 7),
    ];
    (log, products)
}

#[test]
fn words_match_exactly_by_prefix_with_one_typo_and_without_accents() {
    let dir = tempfile::tempdir().unwrap();
    let index = Generation::open(dir.path()).unwrap();
    let (log, p) = catalog();
    index.apply(&log.events).unwrap();
    let set = |q: &str| {
        let mut found = ids(&index, &query(q));
        found.sort();
        found
    };
    let sorted = |mut v: Vec<Uuid>| {
        v.sort();
        v
    };
    // Exact, any letter case.
    assert_eq!(set("KEYBOARD"), vec![p[3]]);
    // A prefix: "mug" also finds "mugs"; "ceram" finds "ceramic".
    assert_eq!(set("mug"), sorted(vec![p[0], p[1], p[5]]));
    assert_eq!(set("ceram"), vec![p[0]]);
    // One typo (a substitution, a missing letter, a swap) in a word of 5+ letters.
    assert_eq!(set("keybaord"), vec![p[3]]);
    assert_eq!(set("espreso"), vec![p[1]]);
    assert_eq!(set("ceramix"), vec![p[0]]);
    // Not in short words: "cap" is not "cup".
    assert!(set("cap").is_empty());
    // Two typos are too many.
    assert!(set("kyebaord").is_empty());
    // Accents fold both ways.
    assert_eq!(set("creme brulee"), vec![p[2]]);
    assert_eq!(set("CRÈME"), vec![p[2]]);
    assert_eq!(set("francaise"), vec![p[2]]);
    // Other scripts: lower-cased, matched and prefixed.
    assert_eq!(set("ЧАЙНИК"), vec![p[4]]);
    assert_eq!(set("кухон"), vec![p[4]]);
    // Every word must match; punctuation alone matches nothing.
    assert_eq!(set("blue mug"), vec![p[0]]);
    assert!(set("blue torch").is_empty());
    assert!(set("%").is_empty());
    // The sku is searchable.
    assert_eq!(set("sku-3"), vec![p[3]]);
}

#[test]
fn ranking_puts_exact_name_matches_first() {
    let dir = tempfile::tempdir().unwrap();
    let index = Generation::open(dir.path()).unwrap();
    let (log, p) = catalog();
    index.apply(&log.events).unwrap();
    // "mug" in the name beats "mug" in the description only.
    let found = ids(&index, &query("mug"));
    assert_eq!(found.len(), 3);
    let mut first_two = found[..2].to_vec();
    first_two.sort();
    let mut named = vec![p[0], p[5]];
    named.sort();
    assert_eq!(first_two, named, "{found:?}");
    assert_eq!(
        *found.last().unwrap(),
        p[1],
        "description-only match last: {found:?}"
    );
    // An exact word beats a typo of it.
    let mut log2 = Log::new();
    let exact = log2.product("Lantern", "", 100, 1);
    let typo = log2.product("Lanterm", "", 100, 1);
    let dir2 = tempfile::tempdir().unwrap();
    let index2 = Generation::open(dir2.path()).unwrap();
    index2.apply(&log2.events).unwrap();
    assert_eq!(ids(&index2, &query("lantern")), vec![exact, typo]);
}

#[test]
fn filters_sorts_facets_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let index = Generation::open(dir.path()).unwrap();
    let (log, p) = catalog();
    index.apply(&log.events).unwrap();
    let mut q = query("mug");
    q.in_stock = true;
    q.sort = Sort::PriceAsc;
    // The espresso cup has no stock.
    assert_eq!(ids(&index, &q), vec![p[0], p[5]]);
    q.sort = Sort::PriceDesc;
    assert_eq!(ids(&index, &q), vec![p[5], p[0]]);
    q.in_stock = false;
    q.min_price_cents = Some(1_000);
    q.max_price_cents = Some(1_999);
    assert_eq!(ids(&index, &q), vec![p[0]]);
    // Facets count every match of the words, whatever the filters.
    let found = index.search(&q).unwrap();
    assert_eq!(found.total, 1);
    let counts: Vec<u64> = found.facets.price.iter().map(|b| b.count).collect();
    assert_eq!(counts, vec![1, 2, 0, 0, 0]);
    assert_eq!(found.facets.price[1].min_price_cents, 1_000);
    assert_eq!(found.facets.price[1].max_price_cents, Some(4_999));
    assert_eq!(found.facets.price[4].max_price_cents, None);
    assert_eq!(
        (
            found.facets.availability.in_stock,
            found.facets.availability.out_of_stock
        ),
        (2, 1)
    );
    // Without words: every product, newest first, paged by offset.
    let all = SearchQuery {
        limit: 4,
        ..SearchQuery::default()
    };
    let first = ids(&index, &all);
    assert_eq!(first, vec![p[5], p[4], p[3], p[2]]);
    let rest = ids(
        &index,
        &SearchQuery {
            offset: 4,
            ..all.clone()
        },
    );
    assert_eq!(rest, vec![p[1], p[0]]);
    assert_eq!(index.search(&all).unwrap().total, 6);
}

#[test]
fn highlights_mark_the_matched_words_in_escaped_text() {
    let dir = tempfile::tempdir().unwrap();
    let index = Generation::open(dir.path()).unwrap();
    let mut log = Log::new();
    log.product(
        "Tom & Jerry <mug>",
        "A mug, with a long story. ".repeat(20).as_str(),
        500,
        1,
    );
    index.apply(&log.events).unwrap();
    let hit = index.search(&query("mug")).unwrap().hits.remove(0);
    let h = hit.highlight.unwrap();
    assert_eq!(
        h.name.as_deref(),
        Some("Tom &amp; Jerry &lt;<mark>mug</mark>&gt;")
    );
    let description = h.description.unwrap();
    assert!(
        description.starts_with("A <mark>mug</mark>, with"),
        "{description}"
    );
    assert!(description.ends_with('…'), "cut: {description}");
    // A typo is marked too.
    let hit = index.search(&query("storry")).unwrap().hits.remove(0);
    assert!(
        hit.highlight
            .unwrap()
            .description
            .unwrap()
            .contains("<mark>story</mark>")
    );
}

#[test]
fn stock_and_changes_follow_the_events_and_one_pass_equals_event_by_event() {
    let (mut log, p) = catalog();
    log.push(
        p[0],
        &ProductUpdated {
            product_id: p[0],
            sku: "SKU-0".into(),
            name: "Green ceramic mug".into(),
            price_cents: 1_400,
            currency: "EUR".into(),
            initial_stock: 10,
            changed: vec!["name".into(), "price_cents".into()],
            description: None,
            at: None,
        },
    );
    reserve(&mut log, p[0], 4);
    log.push(
        p[1],
        &InventoryAdjusted {
            product_id: p[1],
            delta: 9,
            reason: "delivery".into(),
            available: 9,
        },
    );
    let whole = tempfile::tempdir().unwrap();
    let one_pass = Generation::open(whole.path()).unwrap();
    one_pass.apply(&log.events).unwrap();
    let docs = one_pass.all().unwrap();
    let mug = docs.iter().find(|d| d.id == p[0]).unwrap();
    assert_eq!(
        (mug.name.as_str(), mug.price_cents, mug.available),
        ("Green ceramic mug", 1_400, 6)
    );
    assert_eq!(
        mug.description, "Holds coffee and tea",
        "kept: the update did not carry it"
    );
    assert_eq!(docs.iter().find(|d| d.id == p[1]).unwrap().available, 9);
    assert_eq!(ids(&one_pass, &query("blue")), vec![p[3]]);
    assert_eq!(one_pass.position().unwrap(), log.events.len() as i64);

    // Event by event, closing and reopening the folder half way (a restart).
    let folder = tempfile::tempdir().unwrap();
    let half = log.events.len() / 2;
    {
        let index = Generation::open(folder.path()).unwrap();
        for event in &log.events[..half] {
            index.apply(std::slice::from_ref(event)).unwrap();
        }
        index.close();
    }
    // The reopened index goes on from its last commit, as the projection does
    // (a count held in memory was not committed: its event is applied again).
    let index = Generation::open(folder.path()).unwrap();
    let committed = index.position().unwrap();
    assert!(committed <= half as i64, "{committed} > {half}");
    for event in &log.events[committed as usize..] {
        index.apply(std::slice::from_ref(event)).unwrap();
    }
    assert_eq!(index.all().unwrap(), docs);
}

/// An inventory reservation event for `quantity` of `product`.
fn reserve(log: &mut Log, product: Uuid, quantity: i64) {
    let order = Uuid::now_v7();
    log.push(
        order,
        &InventoryReserved {
            order_id: order,
            items: vec![StockLine {
                product_id: product,
                quantity,
            }],
        },
    );
}

#[test]
fn a_stock_count_that_searches_do_not_see_waits_for_the_next_commit() {
    let mut log = Log::new();
    let mug = log.product("Blue mug", "Holds tea", 1_000, 10);
    let cup = log.product("Espresso cup", "Holds coffee", 800, 5);
    for _ in 0..3 {
        reserve(&mut log, mug, 1);
    }
    let in_stock = SearchQuery {
        in_stock: true,
        ..query("holds")
    };
    let folder = tempfile::tempdir().unwrap();
    let count = |index: &Generation, id: Uuid| {
        index
            .all()
            .unwrap()
            .into_iter()
            .find(|d| d.id == id)
            .unwrap()
            .available
    };
    {
        let index = Generation::open(folder.path()).unwrap();
        index.apply(&log.events[..2]).unwrap();
        assert_eq!(index.position().unwrap(), 2);
        // 10 → 7: still in stock to every search. Held, not committed; the
        // documents read through the held count.
        for event in &log.events[2..] {
            assert_eq!(index.apply(std::slice::from_ref(event)).unwrap(), 1);
        }
        assert_eq!(index.position().unwrap(), 2, "nothing committed");
        assert_eq!(index.held_counts(), 1);
        assert_eq!(count(&index, mug), 7);
        assert_eq!(index.search(&in_stock).unwrap().total, 2);
        index.close();
    }
    // A restart: the held counts are gone with the process, and the events after
    // the last commit are applied again to the committed documents.
    let index = Generation::open(folder.path()).unwrap();
    assert_eq!(index.position().unwrap(), 2);
    assert_eq!(count(&index, mug), 10);
    index.apply(&log.events[2..]).unwrap();
    assert_eq!(count(&index, mug), 7);
    // The cup's last 5 taken: out of stock is something searches see. It is
    // committed at once, and the mug's held count with it.
    reserve(&mut log, cup, 5);
    let last = log.events.len();
    index.apply(&log.events[last - 1..]).unwrap();
    assert_eq!(index.position().unwrap(), last as i64);
    assert_eq!(index.held_counts(), 0);
    assert_eq!(ids(&index, &in_stock), vec![mug]);
    let search = index.search(&query("holds")).unwrap();
    let availability = &search.facets.availability;
    assert_eq!((availability.in_stock, availability.out_of_stock), (1, 1));
    // Reopened, the commit holds both counts.
    index.close();
    let index = Generation::open(folder.path()).unwrap();
    assert_eq!((count(&index, mug), count(&index, cup)), (7, 0));
    // A count held longer than COUNTS_HELD is committed by the next batch.
    reserve(&mut log, mug, 1);
    index.apply(&log.events[last..last + 1]).unwrap();
    assert_eq!(index.position().unwrap(), last as i64);
    std::thread::sleep(scaleshop_search::index::COUNTS_HELD);
    reserve(&mut log, mug, 1);
    index.apply(&log.events[last + 1..]).unwrap();
    assert_eq!(index.position().unwrap(), last as i64 + 2);
    assert_eq!(index.held_counts(), 0);
    index.close();
    let index = Generation::open(folder.path()).unwrap();
    assert_eq!(count(&index, mug), 5);
}

#[test]
fn a_batch_that_touches_no_product_commits_nothing() {
    let mut log = Log::new();
    let p = Uuid::now_v7();
    log.push(
        p,
        &ProductCreated {
            product_id: p,
            sku: "TEA-1".into(),
            name: "Green tea".into(),
            price_cents: 500,
            currency: "EUR".into(),
            initial_stock: 3,
            description: None,
            at: None,
        },
    );
    let order = Uuid::now_v7();
    log.push(
        order,
        &scaleshop_contracts::OrderCancelled {
            order_id: order,
            user_id: Uuid::now_v7(),
            at: None,
        },
    );
    let folder = tempfile::tempdir().unwrap();
    {
        let index = Generation::open(folder.path()).unwrap();
        assert_eq!(index.apply(&log.events[..1]).unwrap(), 1);
        assert_eq!(index.position().unwrap(), 1);
        // Another service's event: nothing is written, not even the position.
        assert_eq!(index.apply(&log.events[1..]).unwrap(), 0);
        assert_eq!(index.position().unwrap(), 1);
        index.close();
    }
    // After a restart the event is read again and passed over again.
    let index = Generation::open(folder.path()).unwrap();
    assert_eq!(index.apply(&log.events[1..]).unwrap(), 0);
    assert_eq!(index.len(), 1);
    assert_eq!(ids(&index, &query("tea")), vec![p]);
}
