//! One generation of the product index: a tantivy index in a folder of its own,
//! its schema and analyzer, and the application of a batch of events to it. A
//! batch is one tantivy commit whose payload is the log position it reaches, so
//! the documents and the position move together: after a crash the index is at
//! the last commit, and the events after it are applied again exactly once.
//!
//! A stock count is indexed only for what searches ask of it: in stock or not
//! (the filter and the facet). A batch whose only effect is on counts that stay
//! on the same side of zero (most reservations under an order load) is not
//! committed at once: the new counts are held in memory ([`Generation::get`] and
//! [`Generation::all`] read through them, searches need nothing from them) and
//! written with the next commit, which comes with the next change searches see,
//! or at most [`COUNTS_HELD`] after the first count held. Such a batch, like one
//! that touches no product, does not move the committed position: after a
//! restart its events are applied again to the documents as committed. This
//! spares a tantivy commit per reservation (a segment, a new indexing thread and
//! its 15 MB table, a reader reload), the index's main cost under an order load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use scaleshop_contracts::Contract;
use scaleshop_contracts::catalog::{ProductCreated, ProductUpdated};
use scaleshop_contracts::inventory::{InventoryAdjusted, InventoryReleased, InventoryReserved};
use scaleshop_events::Event;
use serde::{Deserialize, Serialize};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};
use uuid::Uuid;

use crate::SearchError;

/// The analyzer of every text field and of query text: words split on anything
/// that is not a letter or digit (Unicode), lower-cased (Unicode), accents folded
/// to ASCII where a folding exists (`crème` → `creme`, `Straße` → `strasse`).
pub const ANALYZER: &str = "folded";

/// Bumped when the schema or the analyzer changes: an index of another version is
/// built again from the log.
pub const SCHEMA_VERSION: u32 = 1;

/// The indexer's memory before it writes a segment (tantivy's minimum is 15 MB).
const WRITER_MEMORY: usize = 15_000_000;
/// Decompressed blocks of stored documents kept per segment.
const DOC_STORE_CACHE_BLOCKS: usize = 4;
/// How long a stock count that changed nothing searches see may wait for a
/// commit (the events a restart applies again are at most this old).
pub const COUNTS_HELD: Duration = Duration::from_secs(5);

pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(64))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

/// The fields of a product document.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    pub id: Field,
    pub sku: Field,
    pub name: Field,
    pub description: Field,
    pub price: Field,
    pub available: Field,
    pub created: Field,
    pub currency: Field,
}

impl Fields {
    fn schema() -> (Schema, Fields) {
        let mut b = Schema::builder();
        let text = TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(ANALYZER)
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions),
            )
            .set_stored();
        let fields = Fields {
            id: b.add_text_field("id", STRING | STORED),
            sku: b.add_text_field("sku", text.clone()),
            name: b.add_text_field("name", text.clone()),
            description: b.add_text_field("description", text),
            price: b.add_i64_field("price_cents", INDEXED | FAST | STORED),
            available: b.add_i64_field("available", INDEXED | FAST | STORED),
            created: b.add_i64_field("created_micros", FAST | STORED),
            currency: b.add_text_field("currency", STRING | STORED),
        };
        (b.build(), fields)
    }
}

/// What a commit's payload records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Payload {
    position: i64,
    schema: u32,
}

/// A product as the index holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDoc {
    pub id: Uuid,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub available: i64,
    pub created_micros: i64,
}

impl ProductDoc {
    fn to_document(&self, f: &Fields) -> TantivyDocument {
        let mut doc = TantivyDocument::default();
        doc.add_text(f.id, self.id.to_string());
        doc.add_text(f.sku, &self.sku);
        doc.add_text(f.name, &self.name);
        doc.add_text(f.description, &self.description);
        doc.add_i64(f.price, self.price_cents);
        doc.add_i64(f.available, self.available);
        doc.add_i64(f.created, self.created_micros);
        doc.add_text(f.currency, &self.currency);
        doc
    }

    pub(crate) fn from_document(doc: &TantivyDocument, f: &Fields) -> Option<Self> {
        let text = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_str().map(str::to_owned))
        };
        let int = |field| doc.get_first(field).and_then(|v| v.as_i64());
        Some(Self {
            id: text(f.id)?.parse().ok()?,
            sku: text(f.sku)?,
            name: text(f.name)?,
            description: text(f.description).unwrap_or_default(),
            price_cents: int(f.price)?,
            currency: text(f.currency).unwrap_or_default(),
            available: int(f.available).unwrap_or(0),
            created_micros: int(f.created).unwrap_or(0),
        })
    }
}

/// One index folder, open for reading and writing.
pub struct Generation {
    pub dir: PathBuf,
    pub index: Index,
    pub reader: IndexReader,
    pub fields: Fields,
    writer: Mutex<IndexWriter<TantivyDocument>>,
    held: Mutex<HeldCounts>,
}

/// Stock counts applied but not committed yet (see the module's documentation).
#[derive(Debug, Default)]
struct HeldCounts {
    /// Each product's count, where it differs from the committed document's on
    /// the same side of zero.
    counts: HashMap<Uuid, i64>,
    /// When the first of them was held.
    since: Option<Instant>,
}

impl ProductDoc {
    /// Equal but for the stock count, and on the same side of zero: the same
    /// document to every search.
    fn same_to_searches(&self, other: &Self) -> bool {
        (self.available > 0) == (other.available > 0)
            && Self {
                available: other.available,
                ..self.clone()
            } == *other
    }
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("dir", &self.dir)
            .finish()
    }
}

impl Generation {
    /// Opens the index in `dir`, or makes an empty one there. An index of another
    /// schema version is an error ([`SearchError::Stale`]): the caller builds a
    /// new one.
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir).map_err(|e| SearchError::io(dir, e))?;
        let (schema, fields) = Fields::schema();
        let directory = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| SearchError::Index(e.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        index.tokenizers().register(ANALYZER, analyzer());
        let generation = Self {
            dir: dir.to_owned(),
            reader: index
                .reader_builder()
                .reload_policy(ReloadPolicy::Manual)
                // A page of hits reads ~20 stored documents: a small cache of
                // decompressed blocks per segment (tantivy's default is 100).
                .doc_store_cache_num_blocks(DOC_STORE_CACHE_BLOCKS)
                .num_warming_threads(1)
                .try_into()?,
            writer: Mutex::new(
                index.writer_with_options(
                    tantivy::indexer::IndexWriterOptions::builder()
                        .num_worker_threads(1)
                        .num_merge_threads(1)
                        .memory_budget_per_thread(WRITER_MEMORY)
                        .build(),
                )?,
            ),
            index,
            fields,
            held: Mutex::new(HeldCounts::default()),
        };
        match generation.payload()? {
            Some(p) if p.schema != SCHEMA_VERSION => Err(SearchError::Stale(format!(
                "schema version {} (this build reads {SCHEMA_VERSION})",
                p.schema
            ))),
            _ => Ok(generation),
        }
    }

    fn payload(&self) -> Result<Option<Payload>, SearchError> {
        let metas = self.index.load_metas()?;
        Ok(metas
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok()))
    }

    /// The log position of the last commit (0: nothing applied).
    pub fn position(&self) -> Result<i64, SearchError> {
        Ok(self.payload()?.map_or(0, |p| p.position))
    }

    /// Number of documents visible to searches.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every product in the index, by id, with the stock counts applied (for
    /// comparisons in tests and checks).
    pub fn all(&self) -> Result<Vec<ProductDoc>, SearchError> {
        let mut docs = self.committed()?;
        let held = self.held.lock();
        for doc in &mut docs {
            if let Some(count) = held.counts.get(&doc.id) {
                doc.available = *count;
            }
        }
        Ok(docs)
    }

    /// Stock counts applied but not committed yet.
    pub fn held_counts(&self) -> usize {
        self.held.lock().counts.len()
    }

    /// Every product as committed.
    fn committed(&self) -> Result<Vec<ProductDoc>, SearchError> {
        let searcher = self.reader.searcher();
        let mut docs = Vec::new();
        for segment in searcher.segment_readers() {
            let store = segment
                .get_store_reader(16)
                .map_err(|e| SearchError::io(&self.dir, e))?;
            for doc_id in segment.doc_ids_alive() {
                let doc: TantivyDocument = store.get(doc_id)?;
                docs.extend(ProductDoc::from_document(&doc, &self.fields));
            }
        }
        docs.sort_by_key(|d| d.id);
        Ok(docs)
    }

    /// Product `id` as committed.
    fn get(&self, id: Uuid) -> Result<Option<ProductDoc>, SearchError> {
        let searcher = self.reader.searcher();
        let term = Term::from_field_text(self.fields.id, &id.to_string());
        let query = tantivy::query::TermQuery::new(term, IndexRecordOption::Basic);
        let top = searcher.search(
            &query,
            &tantivy::collector::TopDocs::with_limit(1).order_by_score(),
        )?;
        match top.first() {
            Some((_, address)) => {
                let doc: TantivyDocument = searcher.doc(*address)?;
                Ok(ProductDoc::from_document(&doc, &self.fields))
            }
            None => Ok(None),
        }
    }

    /// Applies `events` (in log order, all after the last event applied) and
    /// commits them with the position of the last one, then makes them visible
    /// to searches. Returns how many events changed a document. A batch in which
    /// no event touches a product (other services' events) commits nothing, and
    /// neither does one that only moves stock counts on the same side of zero
    /// (see the module's documentation): its position is not saved, and after a
    /// restart these events are read and applied again.
    pub fn apply(&self, events: &[Event]) -> Result<usize, SearchError> {
        let Some(last) = events.last() else {
            return Ok(0);
        };
        let mut held = self.held.lock();
        // The documents this batch touches, as committed and as the batch
        // leaves them (the searcher sees only what is committed).
        let mut committed: HashMap<Uuid, Option<ProductDoc>> = HashMap::new();
        let mut touched: HashMap<Uuid, Option<ProductDoc>> = HashMap::new();
        let mut changed = 0;
        for event in events {
            let Some(change) = Change::of(event)? else {
                continue;
            };
            changed += 1;
            for id in change.products() {
                if let std::collections::hash_map::Entry::Vacant(slot) = touched.entry(id) {
                    let doc = self.get(id)?;
                    let mut current = doc.clone();
                    if let (Some(current), Some(count)) = (&mut current, held.counts.get(&id)) {
                        current.available = *count;
                    }
                    committed.insert(id, doc);
                    slot.insert(current);
                }
            }
            change.apply(&mut touched, event);
        }
        if changed == 0 {
            return Ok(0);
        }
        // What searches see changed: written now. A count alone: held. (On a
        // copy: an error leaves the counts as they were, for the batch to be
        // applied again.)
        let mut counts = held.counts.clone();
        let mut write = Vec::new();
        for (id, doc) in touched {
            let before = committed.get(&id).and_then(Option::as_ref);
            match (before, doc) {
                (Some(before), Some(doc)) if before.same_to_searches(&doc) => {
                    if doc.available == before.available {
                        counts.remove(&id);
                    } else {
                        counts.insert(id, doc.available);
                    }
                }
                (None, None) => {}
                (_, doc) => {
                    counts.remove(&id);
                    write.push((id, doc));
                }
            }
        }
        let since = match held.since {
            _ if counts.is_empty() => None,
            Some(since) => Some(since),
            None => Some(Instant::now()),
        };
        if write.is_empty() && since.is_none_or(|t| t.elapsed() < COUNTS_HELD) {
            held.counts = counts;
            held.since = since;
            return Ok(changed);
        }
        // The counts held go with this commit.
        for (id, count) in counts {
            if let Some(mut doc) = self.get(id)? {
                doc.available = count;
                write.push((id, Some(doc)));
            }
        }
        let mut writer = self.writer.lock();
        for (id, doc) in &write {
            writer.delete_term(Term::from_field_text(self.fields.id, &id.to_string()));
            if let Some(doc) = doc {
                writer.add_document(doc.to_document(&self.fields))?;
            }
        }
        let payload = serde_json::to_string(&Payload {
            position: last.sequence,
            schema: SCHEMA_VERSION,
        })
        .map_err(|e| SearchError::Index(e.to_string()))?;
        let mut commit = writer.prepare_commit()?;
        commit.set_payload(&payload);
        commit.commit()?;
        drop(writer);
        held.counts.clear();
        held.since = None;
        drop(held);
        self.reader.reload()?;
        Ok(changed)
    }

    /// Waits for the merge threads, so the folder can be removed or reopened.
    pub fn close(self) {
        if let Err(e) = self.writer.into_inner().wait_merging_threads() {
            tracing::warn!(error = %e, dir = %self.dir.display(), "search index merge threads ended badly");
        }
    }
}

/// What one event does to the index.
enum Change {
    Upsert(ProductCreated),
    Update(ProductUpdated),
    SetStock { product: Uuid, available: i64 },
    Stock(Vec<(Uuid, i64)>),
}

impl Change {
    /// The change `event` makes, if it is one the index follows. An event it
    /// follows but cannot read is an error: the index stops rather than skip it.
    fn of(event: &Event) -> Result<Option<Self>, SearchError> {
        let bad = |e: scaleshop_contracts::DecodeError| SearchError::Event {
            sequence: event.sequence,
            message: e.to_string(),
        };
        Ok(Some(match event.kind.as_str() {
            ProductCreated::NAME => Self::Upsert(event.decode().map_err(bad)?),
            ProductUpdated::NAME => Self::Update(event.decode().map_err(bad)?),
            InventoryAdjusted::NAME => {
                let e: InventoryAdjusted = event.decode().map_err(bad)?;
                Self::SetStock {
                    product: e.product_id,
                    available: e.available,
                }
            }
            InventoryReserved::NAME => {
                let e: InventoryReserved = event.decode().map_err(bad)?;
                Self::Stock(
                    e.items
                        .iter()
                        .map(|l| (l.product_id, -l.quantity))
                        .collect(),
                )
            }
            InventoryReleased::NAME => {
                let e: InventoryReleased = event.decode().map_err(bad)?;
                Self::Stock(e.items.iter().map(|l| (l.product_id, l.quantity)).collect())
            }
            _ => return Ok(None),
        }))
    }

    fn products(&self) -> Vec<Uuid> {
        match self {
            Self::Upsert(e) => vec![e.product_id],
            Self::Update(e) => vec![e.product_id],
            Self::SetStock { product, .. } => vec![*product],
            Self::Stock(lines) => lines.iter().map(|(p, _)| *p).collect(),
        }
    }

    fn apply(self, docs: &mut HashMap<Uuid, Option<ProductDoc>>, event: &Event) {
        match self {
            Self::Upsert(e) => {
                let created = docs.get(&e.product_id).cloned().flatten();
                docs.insert(
                    e.product_id,
                    Some(ProductDoc {
                        id: e.product_id,
                        sku: e.sku,
                        name: e.name,
                        description: e.description.unwrap_or_default(),
                        price_cents: e.price_cents,
                        currency: e.currency,
                        // Stock events about a product come after its creation;
                        // a second creation (none is made) keeps what it knew.
                        available: created.as_ref().map_or(e.initial_stock, |d| d.available),
                        created_micros: event.occurred_at.timestamp_micros(),
                    }),
                );
            }
            Self::Update(e) => {
                if let Some(Some(doc)) = docs.get_mut(&e.product_id) {
                    doc.sku = e.sku;
                    doc.name = e.name;
                    doc.price_cents = e.price_cents;
                    doc.currency = e.currency;
                    if let Some(description) = e.description {
                        doc.description = description;
                    }
                }
            }
            Self::SetStock { product, available } => {
                if let Some(Some(doc)) = docs.get_mut(&product) {
                    doc.available = available;
                }
            }
            Self::Stock(lines) => {
                for (product, delta) in lines {
                    if let Some(Some(doc)) = docs.get_mut(&product) {
                        doc.available = doc.available.saturating_add(delta).max(0);
                    }
                }
            }
        }
    }
}
