//! The key store on both backends: the first key made once under concurrent starts,
//! an existing `signing.key` imported, rotation, pruning, and no secret in sight.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

use std::time::Duration;

use scaleshop_db::{Database, PoolSettings};
use scaleshop_keys::{IMPORTED_FILE, KeyStore, LEGACY_FILE, kid_of, migrations};
use scaleshop_testkit::{Backend, both, fixture};
use scaleshop_web::Keys;

/// A fresh migrated database and an empty data folder.
async fn fresh(backend: Backend) -> (Database, Option<String>, std::path::PathBuf) {
    let (url, dir) = scaleshop_testkit::fresh(backend).await;
    let db = connect(url.as_deref(), &dir).await;
    db.migrate(&migrations()).await.unwrap();
    (db, url, dir)
}

async fn connect(url: Option<&str>, dir: &std::path::Path) -> Database {
    let settings = PoolSettings {
        min_connections: 0,
        max_connections: 4,
        ..PoolSettings::default()
    };
    Database::connect(url, dir, &settings).await.unwrap()
}

both!(
    concurrent_first_starts_make_one_key,
    |backend: Backend| async move {
        let (db, url, dir) = fresh(backend).await;
        // Eight "instances", each with its own pool, start at once on an empty store.
        let mut starts = Vec::new();
        for _ in 0..8 {
            let db = connect(url.as_deref(), &dir).await;
            let dir = dir.clone();
            starts.push(tokio::spawn(async move {
                KeyStore::new(db).prepare(&dir).await.unwrap()
            }));
        }
        let mut generated = 0;
        for start in starts {
            let prepared = start.await.unwrap();
            assert!(prepared.imported.is_none());
            generated += usize::from(prepared.generated.is_some());
        }
        assert_eq!(generated, 1, "exactly one start made the first key");
        let store = KeyStore::new(db);
        let keys = store.list().await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].active() && !keys[0].legacy);
        // A later start changes nothing.
        assert_eq!(
            store.prepare(&dir).await.unwrap(),
            scaleshop_keys::Prepared::default()
        );
        assert_eq!(store.list().await.unwrap(), keys);
    }
);

both!(
    an_existing_signing_key_is_imported_once,
    |backend: Backend| async move {
        let (db, url, dir) = fresh(backend).await;
        let old_secret = [7u8; 32];
        std::fs::write(dir.join(LEGACY_FILE), hex::encode(old_secret)).unwrap();
        // What the earlier version signed: values without a key id.
        let before = Keys::new(&old_secret, Duration::from_secs(60));
        let store = KeyStore::new(db.clone());
        let prepared = store.prepare(&dir).await.unwrap();
        assert_eq!(
            prepared.imported.as_deref(),
            Some(kid_of(&old_secret).as_str())
        );
        assert!(!dir.join(LEGACY_FILE).exists() && dir.join(IMPORTED_FILE).exists());
        let keys = store.list().await.unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].legacy && keys[0].active());

        // Another instance's own signing.key, on a store that already has a key:
        // imported as a retired legacy key that verifies and never signs.
        let other_dir = scaleshop_testkit::temp_dir("keys-other");
        let other_secret = [9u8; 32];
        std::fs::write(other_dir.join(LEGACY_FILE), hex::encode(other_secret)).unwrap();
        let other = KeyStore::new(connect(url.as_deref(), &dir).await);
        other.prepare(&other_dir).await.unwrap();
        let keys = store.list().await.unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[0].kid, kid_of(&other_secret));
        assert!(keys[0].legacy && !keys[0].active());
        assert!(keys[1].active());

        // Values the two old versions signed without a key id verify with the ring.
        let ring = Keys::from_source(std::sync::Arc::new(store.clone()), Duration::from_secs(60))
            .await
            .unwrap();
        let other_before = Keys::new(&other_secret, Duration::from_secs(60));
        for old in [&before, &other_before] {
            let cursor = old.signer.sign("cursor", b"1");
            let bare = cursor.split_once('.').unwrap().1;
            assert_eq!(
                ring.signer.verify("cursor", bare).as_deref(),
                Some(&b"1"[..])
            );
        }
        assert_eq!(ring.signing_kid(), kid_of(&old_secret));
        // Imported once: with the file renamed, a restart imports nothing.
        assert_eq!(
            store.prepare(&dir).await.unwrap(),
            scaleshop_keys::Prepared::default()
        );
        assert_eq!(store.list().await.unwrap().len(), 2);
    }
);

both!(
    rotation_signs_with_the_new_key_and_prunes_the_expired,
    |backend: Backend| async move {
        let (db, url, dir) = fresh(backend).await;
        let store = KeyStore::new(db.clone());
        store.prepare(&dir).await.unwrap();
        let first = store.list().await.unwrap().remove(0);
        let ring = Keys::from_source(std::sync::Arc::new(store.clone()), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(ring.signing_kid(), first.kid);
        let old_cursor = ring.signer.sign("cursor", b"old");
        let old_token = ring.tokens.issue(uuid_nil(), false, 0).unwrap().token;

        // Two rotations at once from two processes: both succeed, in some order.
        let (a, b) = (
            KeyStore::new(connect(url.as_deref(), &dir).await),
            KeyStore::new(connect(url.as_deref(), &dir).await),
        );
        let (ra, rb) = tokio::join!(a.rotate(), b.rotate());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_ne!(ra.kid, rb.kid);
        let keys = store.list().await.unwrap();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(keys.iter().filter(|k| k.active()).count(), 1, "{keys:?}");
        let newest = keys.last().unwrap().clone();
        assert!(newest.active() && newest.generation == 3);
        assert!(keys[..2].iter().all(|k| k.retired_at.is_some()));

        // A value naming the new key: the ring learns it and signs with it.
        let other = Keys::from_source(std::sync::Arc::new(a.clone()), Duration::from_secs(60))
            .await
            .unwrap();
        let new_cursor = other.signer.sign("cursor", b"new");
        assert!(new_cursor.starts_with(&format!("{}.", newest.kid)));
        assert!(ring.signer.verify("cursor", &new_cursor).is_none());
        ring.ensure_value_kid(&new_cursor).await;
        assert_eq!(
            ring.signer.verify("cursor", &new_cursor).as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(ring.signing_kid(), newest.kid);
        // What the retired key signed still verifies.
        assert_eq!(
            ring.signer.verify("cursor", &old_cursor).as_deref(),
            Some(&b"old"[..])
        );
        assert!(ring.tokens.verify(&old_token).is_some());

        // Pruning: nothing retired before an hour ago; everything retired before now,
        // but never the key that signs.
        let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
        assert!(store.prune(hour_ago).await.unwrap().is_empty());
        let future = chrono::Utc::now() + chrono::Duration::seconds(1);
        let pruned = store.prune(future).await.unwrap();
        assert_eq!(pruned.len(), 2);
        let keys = store.list().await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid, newest.kid);
        // After a refresh the pruned key verifies nothing.
        ring.refresh().await.unwrap();
        assert!(ring.signer.verify("cursor", &old_cursor).is_none());
        assert!(ring.tokens.verify(&old_token).is_none());
    }
);

both!(secrets_stay_out_of_debug, |backend: Backend| async move {
    let (db, _url, dir) = fresh(backend).await;
    let store = KeyStore::new(db);
    store.prepare(&dir).await.unwrap();
    let material = store.load().await.unwrap();
    assert_eq!(material.len(), 1);
    let secret_hex = hex::encode(&material[0].secret);
    let shown = format!("{material:?} {:?} {store:?}", store.list().await.unwrap());
    assert!(!shown.contains(&secret_hex), "{shown}");
    assert!(
        !shown.contains(&format!("{:?}", material[0].secret)),
        "{shown}"
    );
    assert!(shown.contains(&material[0].kid));
});

fn uuid_nil() -> uuid::Uuid {
    uuid::Uuid::nil()
}
