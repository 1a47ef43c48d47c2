//! What a process that holds the data folder's lock takes back at start. The lock
//! proves that no other process serves this (SQLite) database, so whatever is still
//! held was held by a process that died: waiting for leases to run out would only
//! delay the work. Consumer leases are freed, running jobs become claimable (their
//! interrupted run counts as an attempt, as a lease expiry would), and in-flight
//! idempotency keys are forgotten (their requests died; nothing they did committed).

use scaleshop_db::{Database, StoreError};

use crate::modules::Module;

/// Takes back what a dead predecessor held, for the modules this process runs.
pub async fn take_back(db: &Database, modules: &[Module]) -> Result<(), StoreError> {
    let mut consumers = 0;
    let mut jobs = 0;
    let mut keys = 0;
    if modules.contains(&Module::Events) {
        consumers = scaleshop_events::dispatch::release_all_leases(db).await?;
    }
    if modules.contains(&Module::Jobs) {
        jobs = scaleshop_jobs::worker::expire_all_leases(db).await?;
    }
    if modules.contains(&Module::Orders) {
        keys = scaleshop_orders::idempotency::Idempotency::new(db.clone())
            .forget_in_flight()
            .await?;
    }
    if consumers + jobs + keys > 0 {
        tracing::info!(
            consumers,
            jobs,
            idempotency_keys = keys,
            "took back what the previous process held when it stopped"
        );
    }
    Ok(())
}
