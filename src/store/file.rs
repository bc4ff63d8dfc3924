//! The state database as a file: one exporter per file, and whether the file at `--db` is still
//! the one the exporter opened.
//!
//! A second exporter on the same database pops batches it can never commit (the first one
//! wrote the same rows: `UNIQUE constraint failed`) and loses them. So the first one takes an
//! exclusive `flock` on the database file for the process's life, as Prometheus locks its data
//! directory, and a second one is refused at start, before it pops anything. SQLite's own locks
//! are `fcntl` locks, which a `flock` does not touch.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

use super::StoreError;

/// What a path names, whatever it is called: the file's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The database file, open and locked for as long as the store lives.
#[derive(Debug)]
pub struct Lock {
    /// Holds the lock; closing it (the process ending, even killed) releases it.
    _file: File,
    watch: FileWatch,
}

impl Lock {
    /// Lock `file`, just opened at `path`; fails when another process holds it.
    pub fn take(file: File, path: &Path) -> Result<Lock, StoreError> {
        let open_err = |e: std::io::Error| StoreError::Open {
            path: path.to_owned(),
            source: e.into(),
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(StoreError::InUse {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(open_err(e.into())),
        }
        let id = FileId::of(&file.metadata().map_err(open_err)?);
        Ok(Lock {
            _file: file,
            watch: FileWatch {
                path: path.to_owned(),
                id,
            },
        })
    }

    pub fn watch(&self) -> FileWatch {
        self.watch.clone()
    }
}

/// Tells whether the path of the database still names the file the exporter opened. Deleted
/// or replaced under it, the exporter commits to a file no restart will open: the counts
/// would start from zero.
#[derive(Debug, Clone)]
pub struct FileWatch {
    path: PathBuf,
    id: FileId,
}

impl FileWatch {
    /// How often the exporter looks (one `stat`).
    pub const EVERY: Duration = Duration::from_secs(2);

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` while the path names the file opened; otherwise what became of it.
    pub fn lost(&self) -> Option<String> {
        let why = match std::fs::metadata(&self.path) {
            Ok(m) if FileId::of(&m) == self.id => return None,
            Ok(_) => "was replaced by another file",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "was deleted",
            // Not readable for a moment (permissions, a stale mount): nothing is known.
            Err(_) => return None,
        };
        Some(format!(
            "the state database {} {why} under the running exporter: it commits to the file it opened, which a restart will not read (restart it once the right file is at --db)",
            self.path.display()
        ))
    }
}

impl FileWatch {
    /// Look every [`FileWatch::EVERY`] until `stop`; the first time the file is lost, hand the
    /// reason to `lost` (once: it stays lost for the process's life) and end.
    pub async fn run(
        self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        lost: impl FnOnce(String),
    ) {
        let mut every = tokio::time::interval(FileWatch::EVERY);
        while !*stop.borrow() {
            tokio::select! {
                _ = every.tick() => {}
                changed = stop.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            }
            // One `stat`: cheap enough for the runtime's thread.
            if let Some(why) = self.lost() {
                return lost(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_file_is_refused_naming_it_and_freed_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let open = || File::create(&path).unwrap();
        let first = Lock::take(open(), &path).unwrap();
        let e = Lock::take(open(), &path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("another cpa-usage-exporter"), "{e}");
        drop(first);
        Lock::take(open(), &path).unwrap();
    }

    #[test]
    fn a_deleted_or_replaced_file_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let lock = Lock::take(File::create(&path).unwrap(), &path).unwrap();
        let watch = lock.watch();
        assert_eq!(watch.lost(), None);
        std::fs::remove_file(&path).unwrap();
        assert!(watch.lost().unwrap().contains("was deleted"));
        std::fs::write(&path, b"").unwrap();
        assert!(watch.lost().unwrap().contains("was replaced"));
    }
}
