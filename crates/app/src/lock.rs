//! The data folder's lock. On SQLite one process owns the data folder: it holds an
//! advisory lock on `data_dir/scaleshop.lock` for its whole life (the operating
//! system drops it when the process ends, even on kill -9), and a second process on
//! the same folder is refused at start. Because the lock proves that no other
//! process is alive, a process that gets it may take back at once everything a
//! dead predecessor held (consumer leases, running jobs, in-flight idempotency
//! keys): see [`crate::recovery`].

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The lock file's name inside the data folder.
pub const LOCK_FILE: &str = "scaleshop.lock";

/// Why the data folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the data folder {folder} is in use by another scaleshop process{holder}; \
         one process at a time may use a data folder with SQLite: stop that process or \
         choose another data_dir"
    )]
    InUse { folder: String, holder: String },
    #[error("cannot lock the data folder {folder}: {source}")]
    Io {
        folder: String,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Locks the data folder when the configuration keeps data in SQLite (`None`
    /// with PostgreSQL, where processes share the database by design).
    pub fn for_config(config: &Config) -> Result<Option<Self>, LockError> {
        let sqlite = config
            .database_url
            .as_ref()
            .is_none_or(|url| url.expose().starts_with("sqlite:"));
        if !sqlite {
            return Ok(None);
        }
        Self::acquire(&config.data_dir).map(Some)
    }

    /// Takes the lock of `folder` (created if missing) without waiting.
    pub fn acquire(folder: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            folder: folder.display().to_string(),
            source,
        };
        std::fs::create_dir_all(folder).map_err(io)?;
        let path = folder.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::InUse {
                    folder: folder.display().to_string(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's pid, for the message a second process prints.
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(std::process::id().to_string().as_bytes())
            .map_err(io)?;
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_folder_is_refused_until_the_first_is_dropped() {
        let folder = std::env::temp_dir().join(format!(
            "scaleshop-lock-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let first = DataDirLock::acquire(&folder).unwrap();
        let error = DataDirLock::acquire(&folder).unwrap_err().to_string();
        assert!(error.contains(&folder.display().to_string()), "{error}");
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
        drop(first);
        let again = DataDirLock::acquire(&folder).unwrap();
        assert_eq!(again.path(), folder.join(LOCK_FILE));
        drop(again);
        let _ = std::fs::remove_dir_all(&folder);
    }
}
