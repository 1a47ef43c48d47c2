//! Password hashing (argon2id, m = 19456 KiB, t = 2, p = 1) with bounded memory
//! and concurrency.
//!
//! Each hash or verify needs 19 MiB of working memory and about 10 ms of one core.
//! At most `concurrency` of them run at once in a process; each runs on the blocking
//! pool with one of at most `concurrency` working buffers, allocated on first use and
//! kept (so no hash pays for fresh pages, and the memory held for hashing is bounded
//! by `concurrency` × 19 MiB whatever the load). A caller waits for its turn at most
//! `queue_wait`, then gets [`UsersError::Busy`] (503 with `Retry-After`).
//!
//! Hashes are standard PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`),
//! the same the `argon2` crate writes and reads; verify honours the algorithm,
//! version and parameters written in the stored string.

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash as Phc, Version};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::{Password, PasswordHash};
use crate::service::UsersError;

/// The OWASP parameters every new hash uses.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;
const OUTPUT_LEN: usize = 32;
const SALT_LEN: usize = 16;

/// How many hashes run at once and how long a caller waits for its turn.
#[derive(Debug, Clone, Copy)]
pub struct HashSettings {
    pub concurrency: NonZeroUsize,
    pub queue_wait: Duration,
}

impl HashSettings {
    /// One hash per core (as the OS reports them), and 2 s of waiting.
    pub fn from_cores() -> Self {
        Self {
            concurrency: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            queue_wait: Duration::from_secs(2),
        }
    }
}

impl Default for HashSettings {
    fn default() -> Self {
        Self::from_cores()
    }
}

/// The password hasher of one process (clones share the limit and the buffers).
#[derive(Debug, Clone)]
pub struct Hasher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    /// Idle working buffers; never more than `concurrency` exist.
    buffers: Mutex<Vec<Vec<Block>>>,
    queue_wait: Duration,
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new(HashSettings::default())
    }
}

/// The right to run one hash, with its working memory. Dropping it gives both back.
struct Lease {
    inner: Arc<Inner>,
    memory: Vec<Block>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let memory = std::mem::take(&mut self.memory);
        if !memory.is_empty() {
            self.inner.buffers.lock().push(memory);
        }
    }
}

fn params() -> Result<Params, UsersError> {
    Params::new(M_COST_KIB, T_COST, P_COST, Some(OUTPUT_LEN)).map_err(hashing_error)
}

fn hashing_error(error: impl std::fmt::Display) -> UsersError {
    UsersError::Hashing(error.to_string())
}

/// A new PHC string for `password`, computed in `memory` with a fresh salt.
fn hash_in(memory: &mut [Block], password: &[u8]) -> Result<String, UsersError> {
    let salt = argon2::password_hash::try_generate_salt().map_err(hashing_error)?;
    hash_with_salt(memory, password, &salt)
}

fn hash_with_salt(
    memory: &mut [Block],
    password: &[u8],
    salt: &[u8; SALT_LEN],
) -> Result<String, UsersError> {
    let params = params()?;
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let mut out = [0u8; OUTPUT_LEN];
    argon2
        .hash_password_into_with_memory(password, salt, &mut out, memory)
        .map_err(hashing_error)?;
    let phc = Phc {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(hashing_error)?,
        salt: Some(Salt::new(salt).map_err(hashing_error)?),
        hash: Some(Output::new(&out).map_err(hashing_error)?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the stored PHC string, computed in `memory` when it is
/// large enough for the string's parameters (else in memory of its own). A string
/// that is not an argon2 hash never matches.
fn verify_in(memory: &mut [Block], password: &[u8], stored: &str) -> bool {
    let Ok(phc) = Phc::new(stored) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&phc.salt, &phc.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::new(phc.algorithm.as_str()) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from).transpose() {
        Ok(version) => version.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&phc) else {
        return false;
    };
    let argon2 = Argon2::new(algorithm, version, params.clone());
    let mut out = vec![0u8; expected.len()];
    let computed = if params.block_count() <= memory.len() {
        argon2.hash_password_into_with_memory(password, salt.as_ref(), &mut out, memory)
    } else {
        argon2.hash_password_into(password, salt.as_ref(), &mut out)
    };
    // `Output`'s equality is constant-time.
    computed.is_ok() && Output::new(&out).is_ok_and(|out| out == *expected)
}

impl Hasher {
    pub fn new(settings: HashSettings) -> Self {
        let concurrency = settings.concurrency.get();
        Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(concurrency)),
                buffers: Mutex::new(Vec::with_capacity(concurrency)),
                queue_wait: settings.queue_wait,
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
        let idle = self.inner.buffers.lock().pop();
        Ok(Lease {
            inner: self.inner.clone(),
            memory: idle.unwrap_or_default(),
            _permit: permit,
        })
    }

    /// Runs `work` on the blocking pool with a lease. The lease moves into the
    /// blocking task, so a caller that gives up (a request timeout) does not free
    /// the turn before the computation ends.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut [Block]) -> T + Send + 'static,
    ) -> Result<T, UsersError> {
        let mut lease = self.lease().await?;
        tokio::task::spawn_blocking(move || {
            if lease.memory.is_empty() {
                let blocks = params().map(|p| p.block_count()).unwrap_or_default();
                lease.memory = vec![Block::new(); blocks];
            }
            work(&mut lease.memory)
        })
        .await
        .map_err(hashing_error)
    }

    pub async fn hash(&self, password: &Password) -> Result<PasswordHash, UsersError> {
        let password = password.clone();
        self.run(move |memory| hash_in(memory, password.expose().as_bytes()))
            .await?
            .map(PasswordHash)
    }

    pub async fn verify(&self, password: &str, hash: &PasswordHash) -> Result<bool, UsersError> {
        let password = password.to_owned();
        let hash = hash.0.clone();
        self.run(move |memory| verify_in(memory, password.as_bytes(), &hash))
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
    use argon2::{PasswordHasher, PasswordVerifier};

    use super::*;

    fn memory() -> Vec<Block> {
        vec![Block::new(); params().unwrap().block_count()]
    }

    #[test]
    fn the_same_phc_string_as_the_argon2_crate() {
        let salt = *b"0123456789abcdef";
        let ours = hash_with_salt(&mut memory(), b"correct horse", &salt).unwrap();
        let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params().unwrap())
            .hash_password_with_salt(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs);
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn verifies_hashes_of_the_argon2_crate_and_its_own() {
        let mut memory = memory();
        // A reused buffer holds the previous hash's blocks: results must not depend on it.
        let ours = hash_in(&mut memory, b"password one").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"password two")
            .unwrap()
            .to_string();
        assert!(verify_in(&mut memory, b"password one", &ours));
        assert!(!verify_in(&mut memory, b"password two", &ours));
        // Other parameters (the crate's defaults) are read from the string.
        assert!(verify_in(&mut memory, b"password two", &theirs));
        assert!(!verify_in(&mut memory, b"password one", &theirs));
        let parsed = Phc::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"password one", &parsed)
                .is_ok()
        );
        // More memory than the buffer holds: computed in memory of its own.
        let big = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(2 * M_COST_KIB, 1, 1, None).unwrap(),
        )
        .hash_password(b"password three")
        .unwrap()
        .to_string();
        assert!(verify_in(&mut memory, b"password three", &big));
        for junk in ["", "not a hash", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA"] {
            assert!(!verify_in(&mut memory, b"password one", junk));
        }
    }

    #[tokio::test]
    async fn a_caller_waits_at_most_the_queue_wait_then_is_busy() {
        let hasher = Hasher::new(HashSettings {
            concurrency: NonZeroUsize::MIN,
            queue_wait: Duration::from_millis(20),
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
        // The one buffer is back in the pool, and no second one was made.
        let idle = hasher.inner.buffers.lock();
        assert_eq!(idle.len(), 1);
        assert_eq!(idle[0].len(), params().unwrap().block_count());
    }
}
