//! The query side of the catalog: who answers a read of many products.
//!
//! A page of every product comes from the product listing projection
//! ([`crate::listing`]) when it can answer (see [`ProductListing::usable`]),
//! else from the command side (the products table, the inventory's stock and
//! the media service's images). A page of search results is ranked as below,
//! then read from the listing the same way.
//!
//! Who answers a search: the search projection (`scaleshop_search`, fed by
//! events) once it has caught up with the log since the start and has applied
//! the log up to the head as it is at the read (every write committed before
//! the read, a token's included), waiting at most `projection_wait`. Otherwise
//! the command side answers: the products table matched by substring, with the
//! same filters, order, facets and paging. So a read model never answers with
//! something older than the command side would.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use scaleshop_db::{Consistency, StoreError};
use scaleshop_events::EventLog;
use scaleshop_search::query::{Availability, PRICE_BANDS, PriceBand};
use scaleshop_search::{Facets, Highlight, ProductSearch, SearchQuery, Sort};
use uuid::Uuid;

use crate::listing::ProductListing;
use crate::{Catalog, CatalogError, Listed};

/// The command side reads at most this many matches to filter, sort and count
/// them (it answers only while the projection cannot).
const COMMAND_SIDE_MAX: i64 = 1000;

/// The search projection and how long a read with a token waits for it.
#[derive(Clone)]
pub struct SearchSide {
    pub index: ProductSearch,
    pub log: EventLog,
    pub wait: Duration,
}

/// Which side answered (the `X-Read-Model` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Projection,
    CommandSide,
}

/// A page of search results.
#[derive(Debug)]
pub struct Found {
    pub items: Vec<(Listed, Option<Highlight>)>,
    /// Every match of words and filters.
    pub total: u64,
    pub facets: Facets,
    pub source: Source,
}

impl Catalog {
    pub fn with_search(mut self, side: SearchSide) -> Self {
        self.search_side = Some(Arc::new(side));
        self
    }

    /// Reads of many products go to this listing projection when it can answer.
    pub fn with_listing(mut self, listing: ProductListing) -> Self {
        self.listing = Some(listing);
        self
    }

    /// Every product, in the order they were made, after `after`.
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<(Vec<Listed>, Source), CatalogError> {
        if let Some(listing) = &self.listing
            && listing.usable().await?
        {
            let page = listing.page(after, limit, consistency).await?;
            return Ok((page, Source::Projection));
        }
        let page = self.search(None, after, limit, consistency).await?;
        Ok((page, Source::CommandSide))
    }

    /// A search: ranked by the projection, or answered by the command side (see
    /// the module's documentation); `consistency` is where its rows may be read.
    pub async fn find(
        &self,
        query: SearchQuery,
        consistency: Consistency,
    ) -> Result<Found, CatalogError> {
        if let Some(side) = &self.search_side
            && side.usable().await?
        {
            match side.index.search(query.clone()).await {
                Ok(hits) => {
                    let ids: Vec<Uuid> = hits.hits.iter().map(|h| h.id).collect();
                    let mut products = self.read_many(&ids, consistency).await?;
                    let mut items = Vec::with_capacity(hits.hits.len());
                    for hit in hits.hits {
                        if let Some(at) = products.iter().position(|l| l.product.id == hit.id) {
                            items.push((products.swap_remove(at), hit.highlight));
                        }
                    }
                    return Ok(Found {
                        items,
                        total: hits.total,
                        facets: hits.facets,
                        source: Source::Projection,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "product search failed on the index; the command side answers");
                }
            }
        }
        self.find_on_command_side(query, consistency).await
    }

    /// The products of `ids`: from the listing when it can answer, any it does
    /// not hold yet (and all of them otherwise) from the command side.
    async fn read_many(
        &self,
        ids: &[Uuid],
        consistency: Consistency,
    ) -> Result<Vec<Listed>, CatalogError> {
        let mut found = Vec::with_capacity(ids.len());
        if let Some(listing) = &self.listing
            && listing.usable().await?
        {
            found = listing.read_many(ids, consistency).await?;
        }
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !found.iter().any(|l| l.product.id == **id))
            .copied()
            .collect();
        if !missing.is_empty() {
            let products = self.store.read_many(&missing, consistency).await?;
            found.extend(self.with_stock(products).await?);
        }
        Ok(found)
    }

    async fn find_on_command_side(
        &self,
        query: SearchQuery,
        consistency: Consistency,
    ) -> Result<Found, CatalogError> {
        let text = query
            .text
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let products = self
            .store
            .search(text, None, COMMAND_SIDE_MAX, consistency)
            .await?;
        let matched = self.with_stock(products).await?;
        let mut facets = Facets {
            price: PRICE_BANDS
                .iter()
                .enumerate()
                .map(|(i, min)| PriceBand {
                    min_price_cents: *min,
                    max_price_cents: PRICE_BANDS.get(i + 1).map(|next| next - 1),
                    count: 0,
                })
                .collect(),
            availability: Availability::default(),
        };
        for listed in &matched {
            let price = listed.product.price_cents.get();
            if let Some(band) = PRICE_BANDS
                .iter()
                .rposition(|min| price >= *min)
                .and_then(|i| facets.price.get_mut(i))
            {
                band.count += 1;
            }
            if listed.available > 0 {
                facets.availability.in_stock += 1;
            } else {
                facets.availability.out_of_stock += 1;
            }
        }
        let mut kept: Vec<Listed> = matched
            .into_iter()
            .filter(|l| {
                let price = l.product.price_cents.get();
                query.min_price_cents.is_none_or(|min| price >= min)
                    && query.max_price_cents.is_none_or(|max| price <= max)
                    && (!query.in_stock || l.available > 0)
            })
            .collect();
        match query.sort {
            Sort::PriceAsc => kept.sort_by_key(|l| l.product.price_cents.get()),
            Sort::PriceDesc => kept.sort_by_key(|l| Reverse(l.product.price_cents.get())),
            Sort::Newest => kept.sort_by_key(|l| Reverse(l.product.created_at)),
            // No ranking here: in the order products were made.
            Sort::Relevance => {}
        }
        let total = kept.len() as u64;
        let items = kept
            .into_iter()
            .skip(query.offset)
            .take(query.limit)
            .map(|l| (l, None))
            .collect();
        Ok(Found {
            items,
            total,
            facets,
            source: Source::CommandSide,
        })
    }
}

impl SearchSide {
    /// May the projection answer this read? Once it serves (it has caught up
    /// with the log since the start) and has applied the log up to the head as
    /// it is now, which holds every write committed before the read.
    async fn usable(&self) -> Result<bool, StoreError> {
        if !self.index.serving() {
            return Ok(false);
        }
        let head = self.log.head().await?;
        Ok(self.index.position() >= head || self.index.wait_for(head, self.wait).await)
    }
}
