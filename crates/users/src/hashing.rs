//! Password hashing (argon2id, m = 19456 KiB, t = 2, p = 1) with bounded memory
//! and concurrency.
//!
//! Each hash or verify needs 19 MiB of working memory and 7 to 17 ms of one core,
//! depending on the SIMD the CPU has. At most `concurrency` of them run at once in
//! a process; each runs on the blocking pool with one of at most `concurrency`
//! working arenas, allocated on first use and kept while they are in use (so a
//! burst of sign-ins pays for fresh pages once, and the memory held for hashing
//! is bounded by `concurrency` × 19 MiB whatever the load); an arena unused for
//! `arena_keep` (5 s) is freed, so a quiet process gives the memory back. An
//! arena is wiped after each use. A caller waits for its
//! turn at most `queue_wait`, then gets [`UsersError::Busy`] (503 with
//! `Retry-After`).
//!
//! The computation is `argon2-rust`'s, a port of the reference implementation
//! whose block compression is picked at run time from what the CPU has (AVX-512,
//! AVX2, SSE2+SSSE3, scalar): one binary for every x86-64, and about twice as
//! fast as the portable `argon2` crate on an AVX-512 core (see
//! docs/benchmarks.md). Hashes are standard PHC strings
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`), the same the `argon2` crate
//! writes and reads, so hashes written by either verify with the other; verify
//! honours the algorithm, version and parameters written in the stored string.

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use argon2_rust::params::{Memory, TagLen};
use argon2_rust::{Algorithm, Argon2, Params, Version};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::{Password, PasswordHash};
use crate::service::UsersError;

/// The OWASP parameters every new hash uses.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;
const OUTPUT_LEN: u64 = 32;

/// How long an arena is kept after its last use: long enough for a burst of
/// sign-ins to reuse it, short enough that a quiet process does not hold
/// `concurrency` × 19 MiB for good.
pub const ARENA_KEEP: Duration = Duration::from_secs(5);

/// How many hashes run at once, how long a caller waits for its turn, and how
/// long an unused arena is kept.
#[derive(Debug, Clone, Copy)]
pub struct HashSettings {
    pub concurrency: NonZeroUsize,
    pub queue_wait: Duration,
    pub arena_keep: Duration,
}

impl HashSettings {
    /// One hash per core (as the OS reports them), and 2 s of waiting.
    pub fn from_cores() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            queue_wait: Duration::from_secs(2),
            arena_keep: ARENA_KEEP,
        }
    }
}

impl Default for HashSettings {
    fn default() -> Self {
        Self::from_cores()
    }
}

/// The password hasher of one process (clones share the limit and the arenas).
#[derive(Debug, Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    arenas: Mutex<Arenas>,
    queue_wait: Duration,
    arena_keep: Duration,
}

/// Idle working arenas (each with the policy's parameters) and when each was
/// last given back; never more than `concurrency` exist. `trimming`: a task
/// frees the ones unused for `arena_keep`, until none is left.
#[derive(Debug, Default)]
struct Arenas {
    idle: Vec<(argon2_rust::Hasher, tokio::time::Instant)>,
    trimming: bool,
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new(HashSettings::default())
    }
}

/// The right to run one hash, with its working arena. Dropping it gives both back.
struct Lease {
    inner: Arc<Inner>,
    arena: Option<argon2_rust::Hasher>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(arena) = self.arena.take() else {
            return;
        };
        let mut arenas = self.inner.arenas.lock();
        arenas.idle.push((arena, tokio::time::Instant::now()));
        // Outside a runtime (never, in the server) the arena is simply kept.
        if !arenas.trimming
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            arenas.trimming = true;
            runtime.spawn(trim(Arc::downgrade(&self.inner)));
        }
    }
}

/// Frees the arenas unused for `arena_keep`, waking when the oldest would be
/// due, until none is left (the next use starts it again).
async fn trim(inner: Weak<Inner>) {
    let mut wait = inner.upgrade().map_or(ARENA_KEEP, |inner| inner.arena_keep);
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let keep = inner.arena_keep;
        let (stale, next): (Vec<_>, _) = {
            let mut arenas = inner.arenas.lock();
            let (stale, kept) = std::mem::take(&mut arenas.idle)
                .into_iter()
                .partition(|(_, used)| used.elapsed() >= keep);
            arenas.idle = kept;
            let next = arenas
                .idle
                .iter()
                .map(|(_, used)| keep.saturating_sub(used.elapsed()))
                .min();
            if next.is_none() {
                arenas.trimming = false;
            }
            (stale, next)
        };
        // Freed outside the lock: 19 MiB each.
        drop(stale);
        match next {
            Some(until_next) => wait = until_next,
            None => return,
        }
    }
}

fn hashing_error(error: impl std::fmt::Display) -> UsersError {
    UsersError::Hashing(error.to_string())
}

/// The policy: argon2id v19 with the OWASP parameters.
fn policy() -> Result<Argon2, UsersError> {
    let params = Params::builder()
        .memory(Memory::kib(u64::from(M_COST_KIB)))
        .passes(T_COST)
        .lanes(P_COST)
        .tag_len(TagLen::bytes(OUTPUT_LEN))
        .build()
        .map_err(hashing_error)?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A new arena for the policy; its memory is mapped on first use.
fn new_arena() -> Result<argon2_rust::Hasher, UsersError> {
    Ok(policy()?.hasher())
}

/// A new PHC string for `password`, computed in `arena` with a fresh salt from
/// the OS.
fn hash_in(arena: &mut argon2_rust::Hasher, password: &[u8]) -> Result<String, UsersError> {
    arena
        .hash_password_with_random_salt(password)
        .map_err(hashing_error)
}

/// Whether `password` matches the stored PHC string, computed in `arena` when it
/// is large enough for the string's parameters (else in an arena of its own,
/// freed at once). A string that is not an argon2 hash never matches; the tags
/// are compared in constant time.
fn verify_in(arena: &mut argon2_rust::Hasher, password: &[u8], stored: &str) -> bool {
    let Ok(decoded) = argon2_rust::decode_phc(stored) else {
        return false;
    };
    arena
        .verify_encoded(stored, password, decoded.algorithm)
        .is_ok()
}

impl Hasher {
    pub fn new(settings: HashSettings) -> Self {
        let concurrency = settings.concurrency.get();
        Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(concurrency)),
                arenas: Mutex::new(Arenas {
                    idle: Vec::with_capacity(concurrency),
                    trimming: false,
                }),
                queue_wait: settings.queue_wait,
                arena_keep: settings.arena_keep,
            }),
        }
    }

    /// Waits (at most `queue_wait`) for a turn; `Busy` when none came.
    async fn lease(&self) -> Result<Lease, UsersError> {
        let permit = tokio::time::timeout(
            self.inner.queue_wait,
            self.inner.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| UsersError::Busy)?
        .map_err(hashing_error)?;
        let idle = self.inner.arenas.lock().idle.pop().map(|(arena, _)| arena);
        Ok(Lease {
            inner: self.inner.clone(),
            arena: idle,
            _permit: permit,
        })
    }

    /// Runs `work` on the blocking pool with a lease. The lease moves into the
    /// blocking task, so a caller that gives up (a request timeout) does not free
    /// the turn before the computation ends.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut argon2_rust::Hasher) -> Result<T, UsersError> + Send + 'static,
    ) -> Result<T, UsersError> {
        let mut lease = self.lease().await?;
        tokio::task::spawn_blocking(move || {
            let arena = match &mut lease.arena {
                Some(arena) => arena,
                none => none.insert(new_arena()?),
            };
            work(arena)
        })
        .await
        .map_err(hashing_error)?
    }

    pub async fn hash(&self, password: &Password) -> Result<PasswordHash, UsersError> {
        let password = password.clone();
        self.run(move |arena| hash_in(arena, password.expose().as_bytes()))
            .await
            .map(PasswordHash)
    }

    pub async fn verify(&self, password: &str, hash: &PasswordHash) -> Result<bool, UsersError> {
        let password = password.to_owned();
        let hash = hash.0.clone();
        self.run(move |arena| Ok(verify_in(arena, password.as_bytes(), &hash)))
            .await
    }

    /// A hash to verify against when the email is unknown, so that a wrong email
    /// costs the same time as a wrong password (no account enumeration by timing).
    pub(crate) async fn decoy(&self) -> Result<PasswordHash, UsersError> {
        static DECOY: OnceLock<PasswordHash> = OnceLock::new();
        if let Some(hash) = DECOY.get() {
            return Ok(hash.clone());
        }
        let password = Password::parse("decoy password for unknown accounts")
            .map_err(|e| UsersError::Hashing(e.to_string()))?;
        let hash = self.hash(&password).await?;
        Ok(DECOY.get_or_init(|| hash).clone())
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::phc::PasswordHash as Phc;
    use argon2::{PasswordHasher, PasswordVerifier};

    use super::*;

    /// The `argon2` crate (the implementation the product used before) with the
    /// given variant, version and parameters.
    fn the_crate(
        algorithm: argon2::Algorithm,
        version: argon2::Version,
        m: u32,
        t: u32,
        p: u32,
    ) -> argon2::Argon2<'static> {
        argon2::Argon2::new(
            algorithm,
            version,
            argon2::Params::new(m, t, p, None).unwrap(),
        )
    }

    fn the_crate_with_the_policy() -> argon2::Argon2<'static> {
        the_crate(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            M_COST_KIB,
            T_COST,
            P_COST,
        )
    }

    #[test]
    fn the_same_phc_string_as_the_argon2_crate() {
        let salt = *b"0123456789abcdef";
        let ours = new_arena()
            .unwrap()
            .hash_encoded(b"correct horse", &salt)
            .unwrap();
        let theirs = the_crate_with_the_policy()
            .hash_password_with_salt(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs);
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn new_hashes_have_the_policy_and_a_fresh_salt() {
        let mut arena = new_arena().unwrap();
        let one = hash_in(&mut arena, b"password one").unwrap();
        let two = hash_in(&mut arena, b"password one").unwrap();
        assert_ne!(one, two);
        for hash in [&one, &two] {
            let phc = Phc::new(hash).unwrap();
            assert_eq!(phc.algorithm.as_str(), "argon2id");
            assert_eq!(phc.version, Some(19));
            assert_eq!(phc.params.to_string(), "m=19456,t=2,p=1");
            assert_eq!(phc.salt.unwrap().len(), 16);
            assert_eq!(phc.hash.unwrap().len(), 32);
        }
    }

    #[test]
    fn the_argon2_crate_verifies_our_hashes() {
        let mut arena = new_arena().unwrap();
        let ours = hash_in(&mut arena, b"password one").unwrap();
        let parsed = Phc::new(&ours).unwrap();
        // Its defaults are not what checks the string: the string's parameters are.
        let the_crate = argon2::Argon2::default();
        assert!(the_crate.verify_password(b"password one", &parsed).is_ok());
        assert!(the_crate.verify_password(b"password two", &parsed).is_err());
    }

    #[test]
    fn verifies_hashes_of_the_argon2_crate() {
        let mut arena = new_arena().unwrap();
        // A reused arena held the previous hash's blocks: results must not depend on it.
        let ours = hash_in(&mut arena, b"password one").unwrap();
        assert!(verify_in(&mut arena, b"password one", &ours));
        assert!(!verify_in(&mut arena, b"password two", &ours));
        let theirs = the_crate_with_the_policy()
            .hash_password(b"password two")
            .unwrap()
            .to_string();
        assert!(theirs.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_in(&mut arena, b"password two", &theirs));
        assert!(!verify_in(&mut arena, b"password one", &theirs));
        // Other variants, versions and parameters are read from the string.
        use argon2::{Algorithm as A, Version as V};
        for (algorithm, version, m, t, p) in [
            (A::Argon2id, V::V0x13, 8_192, 3, 2),
            (A::Argon2id, V::V0x10, 4_096, 1, 1),
            (A::Argon2i, V::V0x13, 4_096, 2, 1),
            (A::Argon2d, V::V0x13, 4_096, 2, 4),
        ] {
            let hash = the_crate(algorithm, version, m, t, p)
                .hash_password(b"password three")
                .unwrap()
                .to_string();
            assert!(verify_in(&mut arena, b"password three", &hash), "{hash}");
            assert!(!verify_in(&mut arena, b"password one", &hash), "{hash}");
        }
        // More memory than the arena holds: computed in an arena of its own, and
        // the kept one does not grow.
        let big = the_crate(A::Argon2id, V::V0x13, 2 * M_COST_KIB, 1, 1)
            .hash_password(b"password four")
            .unwrap()
            .to_string();
        assert!(verify_in(&mut arena, b"password four", &big));
        assert_eq!(arena.reserved_blocks(), M_COST_KIB as usize);
        let salt_only = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0";
        for junk in [
            "",
            "not a hash",
            salt_only,
            "$scrypt$ln=4,r=8,p=1$c2FsdA$aGFzaA",
        ] {
            assert!(!verify_in(&mut arena, b"password one", junk));
        }
        // A truncated tag is not a match.
        let short = &theirs[..theirs.len() - 4];
        assert!(!verify_in(&mut arena, b"password two", short));
    }

    #[tokio::test]
    async fn a_caller_waits_at_most_the_queue_wait_then_is_busy() {
        let hasher = Hasher::new(HashSettings {
            concurrency: NonZeroUsize::MIN,
            queue_wait: Duration::from_millis(20),
            arena_keep: ARENA_KEEP,
        });
        let password = Password::parse("password-123").unwrap();
        let held = hasher.lease().await.unwrap();
        assert!(matches!(
            hasher.hash(&password).await,
            Err(UsersError::Busy)
        ));
        drop(held);
        let hash = hasher.hash(&password).await.unwrap();
        assert!(hasher.verify("password-123", &hash).await.unwrap());
        assert!(!hasher.verify("password-124", &hash).await.unwrap());
        // The one arena is back in the pool, and no second one was made.
        let arenas = hasher.inner.arenas.lock();
        assert_eq!(arenas.idle.len(), 1);
        assert_eq!(arenas.idle[0].0.reserved_blocks(), M_COST_KIB as usize);
    }

    #[tokio::test]
    async fn an_arena_unused_for_its_keep_time_is_freed_and_made_again_on_use() {
        let keep = Duration::from_millis(300);
        let hasher = Hasher::new(HashSettings {
            concurrency: NonZeroUsize::new(2).unwrap(),
            queue_wait: Duration::from_secs(5),
            arena_keep: keep,
        });
        let password = Password::parse("password-123").unwrap();
        // Two at once: two arenas.
        let (a, b) = tokio::join!(hasher.hash(&password), hasher.hash(&password));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(hasher.inner.arenas.lock().idle.len(), 2);
        // Used again before its time: one is kept; the other goes at its time.
        tokio::time::sleep(keep / 2).await;
        assert!(hasher.verify("password-123", &a).await.unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while hasher.inner.arenas.lock().idle.len() == 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an arena was never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Then the last one, and the trimming task ends.
        while !hasher.inner.arenas.lock().idle.is_empty() || hasher.inner.arenas.lock().trimming {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the last arena was never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A hash after that makes a new one, and verifies as before.
        assert!(hasher.verify("password-123", &b).await.unwrap());
        let arenas = hasher.inner.arenas.lock();
        assert_eq!(arenas.idle.len(), 1);
        assert!(arenas.trimming);
    }
}
