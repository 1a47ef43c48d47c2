//! Searching the product index: the query a request makes (words, filters,
//! sort, page), how words match (exact, prefix, one typo for words of five
//! letters or more, all accent-folded), the facet counts and the highlights.

use std::ops::Bound;
use std::sync::OnceLock;

use levenshtein_automata::{Distance, LevenshteinAutomatonBuilder};
use serde::Serialize;
use tantivy::collector::{Collector, Count, SegmentCollector, TopDocs};
use tantivy::columnar::Column;
use tantivy::query::{
    AllQuery, BooleanQuery, BoostQuery, FuzzyTermQuery, Occur, Query, RangeQuery, TermQuery,
};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::tokenizer::TokenStream;
use tantivy::{DocAddress, DocId, Score, Searcher, SegmentReader, TantivyDocument, Term};
use uuid::Uuid;

use crate::SearchError;
use crate::index::{Fields, Generation, analyzer};

/// Words of at least this many letters match with one typo.
pub const TYPO_MIN_CHARS: usize = 5;

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Best match first (text queries); without words, newest first.
    #[default]
    Relevance,
    PriceAsc,
    PriceDesc,
    Newest,
}

impl std::str::FromStr for Sort {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "relevance" => Ok(Self::Relevance),
            "price_asc" => Ok(Self::PriceAsc),
            "price_desc" => Ok(Self::PriceDesc),
            "newest" => Ok(Self::Newest),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for Sort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Relevance => "relevance",
            Self::PriceAsc => "price_asc",
            Self::PriceDesc => "price_desc",
            Self::Newest => "newest",
        })
    }
}

/// A search: words (all must match), filters, order and the page.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    pub text: Option<String>,
    pub min_price_cents: Option<i64>,
    pub max_price_cents: Option<i64>,
    pub in_stock: bool,
    pub sort: Sort,
    pub offset: usize,
    pub limit: usize,
}

/// One result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: Uuid,
    pub highlight: Option<Highlight>,
}

/// The matched words of a result, marked with `<mark>` in HTML-escaped text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Highlight {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Counts over every product the words match, whatever the filters: what each
/// filter would leave.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facets {
    pub price: Vec<PriceBand>,
    pub availability: Availability,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PriceBand {
    pub min_price_cents: i64,
    /// Inclusive; absent for the last band.
    pub max_price_cents: Option<i64>,
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Availability {
    pub in_stock: u64,
    pub out_of_stock: u64,
}

/// The price bands of the facets (inclusive lower bounds, in minor units).
pub const PRICE_BANDS: [i64; 5] = [0, 1_000, 5_000, 10_000, 50_000];

/// What a search found.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHits {
    /// The page, in order.
    pub hits: Vec<Hit>,
    /// Every match of words and filters.
    pub total: u64,
    pub facets: Facets,
}

/// The analyzed words of `text`, in order, without repeats.
pub fn words(text: &str) -> Vec<String> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(text);
    let mut words: Vec<String> = Vec::new();
    while stream.advance() {
        let word = stream.token().text.clone();
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words
}

fn word_query(f: &Fields, word: &str) -> Box<dyn Query> {
    let mut any: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    for (field, weight) in [(f.name, 3.0), (f.sku, 2.0), (f.description, 1.0)] {
        let term = Term::from_field_text(field, word);
        // Exact words score by BM25 (and count twice); prefixes and typos score
        // a constant, so an exact match ranks above them.
        any.push((
            Occur::Should,
            Box::new(BoostQuery::new(
                Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs)),
                weight * 2.0,
            )),
        ));
        any.push((
            Occur::Should,
            Box::new(BoostQuery::new(
                Box::new(FuzzyTermQuery::new_prefix(term.clone(), 0, true)),
                weight * 0.5,
            )),
        ));
        if word.chars().count() >= TYPO_MIN_CHARS {
            any.push((
                Occur::Should,
                Box::new(BoostQuery::new(
                    Box::new(FuzzyTermQuery::new(term, 1, true)),
                    weight * 0.25,
                )),
            ));
        }
    }
    Box::new(BooleanQuery::new(any))
}

fn text_query(f: &Fields, words: &[String]) -> Box<dyn Query> {
    if words.is_empty() {
        return Box::new(AllQuery);
    }
    Box::new(BooleanQuery::new(
        words
            .iter()
            .map(|w| (Occur::Must, word_query(f, w)))
            .collect(),
    ))
}

fn range(field: tantivy::schema::Field, min: Option<i64>, max: Option<i64>) -> RangeQuery {
    let bound = |v: Option<i64>| {
        v.map_or(Bound::Unbounded, |v| {
            Bound::Included(Term::from_field_i64(field, v))
        })
    };
    RangeQuery::new(bound(min), bound(max))
}

impl Generation {
    /// Runs `query` on what this index has committed.
    pub fn search(&self, query: &SearchQuery) -> Result<SearchHits, SearchError> {
        let f = &self.fields;
        let words = query.text.as_deref().map(words);
        // Text was given but holds no word (only punctuation): nothing matches.
        if words.as_ref().is_some_and(Vec::is_empty) {
            return Ok(SearchHits {
                hits: Vec::new(),
                total: 0,
                facets: Facets::default().with_bands(),
            });
        }
        let words = words.unwrap_or_default();
        let matching = text_query(f, &words);
        let mut filtered: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, matching.box_clone())];
        if query.min_price_cents.is_some() || query.max_price_cents.is_some() {
            filtered.push((
                Occur::Must,
                Box::new(range(f.price, query.min_price_cents, query.max_price_cents)),
            ));
        }
        if query.in_stock {
            filtered.push((Occur::Must, Box::new(range(f.available, Some(1), None))));
        }
        let filtered = BooleanQuery::new(filtered);
        let searcher = self.reader.searcher();
        let top = TopDocs::with_limit(query.limit.max(1)).and_offset(query.offset);
        let sort = match query.sort {
            Sort::Relevance if words.is_empty() => Sort::Newest,
            other => other,
        };
        // One order for every sort, with the creation time breaking ties, so a
        // page is the same on every instance whatever its segments.
        let by = move |segment: &SegmentReader| {
            let price = segment.fast_fields().i64("price_cents").ok();
            let created = segment.fast_fields().i64("created_micros").ok();
            move |doc: DocId, score: Score| {
                let price = price.as_ref().and_then(|c| c.first(doc)).unwrap_or(0);
                let created = created.as_ref().and_then(|c| c.first(doc)).unwrap_or(0);
                match sort {
                    Sort::Relevance => (f64::from(score), created),
                    Sort::PriceAsc => (-(price as f64), -created),
                    Sort::PriceDesc => (price as f64, created),
                    Sort::Newest => (created as f64, created),
                }
            }
        };
        let (docs, total) = searcher.search(&filtered, &(top.tweak_score(by), Count))?;
        let addresses: Vec<DocAddress> = docs.into_iter().map(|(_, a)| a).collect();
        let highlighter = (!words.is_empty()).then(|| Highlighter::new(&words));
        let mut hits = Vec::with_capacity(addresses.len());
        for address in addresses {
            let doc: TantivyDocument = searcher.doc(address)?;
            let Some(id) = doc
                .get_first(f.id)
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
            else {
                continue;
            };
            let highlight = highlighter.as_ref().and_then(|h| {
                let text = |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or("");
                let name = h.mark(text(f.name), usize::MAX);
                let description = h.mark(text(f.description), 160);
                (name.is_some() || description.is_some()).then_some(Highlight { name, description })
            });
            hits.push(Hit { id, highlight });
        }
        let facets = facets(&searcher, matching.as_ref())?;
        Ok(SearchHits {
            hits,
            total: total as u64,
            facets,
        })
    }
}

impl Facets {
    fn with_bands(mut self) -> Self {
        self.price = PRICE_BANDS
            .iter()
            .enumerate()
            .map(|(i, min)| PriceBand {
                min_price_cents: *min,
                max_price_cents: PRICE_BANDS.get(i + 1).map(|next| next - 1),
                count: 0,
            })
            .collect();
        self
    }
}

fn facets(searcher: &Searcher, query: &dyn Query) -> Result<Facets, SearchError> {
    let counts = searcher.search(query, &FacetCollector)?;
    let mut facets = Facets::default().with_bands();
    for (band, count) in facets.price.iter_mut().zip(counts.bands) {
        band.count = count;
    }
    facets.availability = Availability {
        in_stock: counts.in_stock,
        out_of_stock: counts.out_of_stock,
    };
    Ok(facets)
}

#[derive(Debug, Default, Clone, Copy)]
struct FacetCounts {
    bands: [u64; PRICE_BANDS.len()],
    in_stock: u64,
    out_of_stock: u64,
}

/// Counts matches by price band and availability from the fast fields.
struct FacetCollector;

struct FacetSegment {
    price: Column<i64>,
    available: Column<i64>,
    counts: FacetCounts,
}

impl Collector for FacetCollector {
    type Fruit = FacetCounts;
    type Child = FacetSegment;

    fn for_segment(&self, _: u32, segment: &SegmentReader) -> tantivy::Result<FacetSegment> {
        Ok(FacetSegment {
            price: segment.fast_fields().i64("price_cents")?,
            available: segment.fast_fields().i64("available")?,
            counts: FacetCounts::default(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<FacetCounts>) -> tantivy::Result<FacetCounts> {
        let mut all = FacetCounts::default();
        for fruit in fruits {
            for (a, b) in all.bands.iter_mut().zip(fruit.bands) {
                *a += b;
            }
            all.in_stock += fruit.in_stock;
            all.out_of_stock += fruit.out_of_stock;
        }
        Ok(all)
    }
}

impl SegmentCollector for FacetSegment {
    type Fruit = FacetCounts;

    fn collect(&mut self, doc: DocId, _: Score) {
        if let Some(price) = self.price.first(doc) {
            let band = PRICE_BANDS
                .iter()
                .rposition(|min| price >= *min)
                .unwrap_or(0);
            if let Some(count) = self.counts.bands.get_mut(band) {
                *count += 1;
            }
        }
        if self.available.first(doc).unwrap_or(0) > 0 {
            self.counts.in_stock += 1;
        } else {
            self.counts.out_of_stock += 1;
        }
    }

    fn harvest(self) -> FacetCounts {
        self.counts
    }
}

fn one_typo() -> &'static LevenshteinAutomatonBuilder {
    static BUILDER: OnceLock<LevenshteinAutomatonBuilder> = OnceLock::new();
    BUILDER.get_or_init(|| LevenshteinAutomatonBuilder::new(1, true))
}

/// Marks the words of a text that a query's words match, by the same rules as
/// the search (exact, prefix, one typo for long words).
struct Highlighter {
    words: Vec<(String, Option<levenshtein_automata::DFA>)>,
}

impl Highlighter {
    fn new(words: &[String]) -> Self {
        Self {
            words: words
                .iter()
                .map(|w| {
                    let dfa =
                        (w.chars().count() >= TYPO_MIN_CHARS).then(|| one_typo().build_dfa(w));
                    (w.clone(), dfa)
                })
                .collect(),
        }
    }

    fn matches(&self, token: &str) -> bool {
        self.words.iter().any(|(w, dfa)| {
            token.starts_with(w.as_str())
                || dfa
                    .as_ref()
                    .is_some_and(|dfa| matches!(dfa.eval(token), Distance::Exact(d) if d <= 1))
        })
    }

    /// `text` HTML-escaped with `<mark>` around matched words, cut to about
    /// `max_chars` around the first match; `None` when nothing matches.
    fn mark(&self, text: &str, max_chars: usize) -> Option<String> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(text);
        let mut spans = Vec::new();
        while stream.advance() {
            let token = stream.token();
            if self.matches(&token.text) {
                spans.push((token.offset_from, token.offset_to));
            }
        }
        let first = spans.first()?.0;
        // The window: from a little before the first match, `max_chars` long.
        let start = if text.chars().count() <= max_chars {
            0
        } else {
            text[..first]
                .char_indices()
                .rev()
                .nth(39)
                .map_or(0, |(i, _)| i)
        };
        let end = text[start..]
            .char_indices()
            .nth(max_chars)
            .map_or(text.len(), |(i, _)| start + i);
        let mut out = String::new();
        if start > 0 {
            out.push('…');
        }
        let mut at = start;
        for (from, to) in spans
            .into_iter()
            .filter(|(from, _)| *from >= start && *from < end)
        {
            let to = to.min(end);
            escape(&text[at..from], &mut out);
            out.push_str("<mark>");
            escape(&text[from..to], &mut out);
            out.push_str("</mark>");
            at = to;
        }
        escape(&text[at..end], &mut out);
        if end < text.len() {
            out.push('…');
        }
        Some(out)
    }
}

fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}
