//! Durable state: cumulative counters and histograms in SQLite, mirrored in memory.
//!
//! SQLite holds one row per series (never per record), so its size follows the number of series.
//! Each popped batch is written in one transaction (WAL, `synchronous=FULL`): a committed batch
//! survives a crash or power loss, an uncommitted one leaves no trace. The in-memory [`State`] is
//! changed only after the commit succeeds, and it is what `/metrics` renders, so a scrape never
//! reads the database and costs O(series).

pub mod budget;
pub mod chains;
pub mod file;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::families::{is_structural_label, outcome, reason, Family, Kind, OVERFLOW_VALUE};
use crate::ingest::quota::{self, Field};
use crate::ingest::{Batch, QuotaObservation};
use crate::series::{Exemplars, Hist, LabelValues, Value};

/// Schema steps; step N (1-based) brings the database to `user_version` N.
const MIGRATIONS: [&str; 4] = [
    // 1: counters and histograms, the dedup window, small values.
    "CREATE TABLE IF NOT EXISTS series (
                     id         INTEGER PRIMARY KEY,
                     family     TEXT    NOT NULL,
                     labels     TEXT    NOT NULL,
                     value      INTEGER,
                     hist       BLOB,
                     updated_at INTEGER NOT NULL,
                     UNIQUE (family, labels)
                 );
                 CREATE TABLE IF NOT EXISTS dedup (seq INTEGER PRIMARY KEY, id INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;",
    // 2: the latest quota and rate-limit values per credential.
    "CREATE TABLE IF NOT EXISTS quota (
                     credential  TEXT NOT NULL,
                     field       TEXT NOT NULL,
                     provider    TEXT NOT NULL,
                     value       REAL NOT NULL,
                     observed_at REAL NOT NULL,
                     PRIMARY KEY (credential, field)
                 ) WITHOUT ROWID;",
    // 3: when each series was created, so a restart within the new-series hold keeps holding it
    // at zero. Rows from before have none and are shown as they are.
    "ALTER TABLE series ADD COLUMN created_at INTEGER;",
    // 4: failover grouping. Open requests (their last attempt failed) by request key, a one-way
    // hash of client key and request_id; and per batch the start times of the requests it
    // finished, kept for the failover window (see chains.rs). No request_id is stored.
    "CREATE TABLE IF NOT EXISTS open_requests (key INTEGER PRIMARY KEY, chain TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS finished_requests (
                     seq  INTEGER PRIMARY KEY,
                     at   REAL NOT NULL,
                     keys BLOB NOT NULL
                 );",
];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
/// `PRAGMA application_id` of our databases ("CPAE"), so another application's SQLite file is
/// recognised and left alone.
pub const APPLICATION_ID: i32 = 0x4350_4145;
/// Schema versions written before databases carried [`APPLICATION_ID`]; such a database is ours
/// when it holds only our tables.
const UNMARKED_VERSIONS: std::ops::RangeInclusive<i64> = 1..=2;
/// Every table those versions created.
const UNMARKED_TABLES: [&str; 4] = ["series", "dedup", "meta", "quota"];
const META_LAST_RECORD_TS: &str = "last_record_timestamp";
/// When the last successful pop started, Unix seconds: the start of a gap across a restart.
const META_LAST_POP: &str = "last_successful_pop";
/// The last pop time is written at most this often (a gap across a restart is measured to
/// within it).
const LAST_POP_EVERY: f64 = 5.0;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the state database {path} has schema version {found}, newer than this exporter's {SCHEMA_VERSION}; use a newer exporter or another --db"
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error(
        "{path} is not a cpa-usage-exporter state database ({why}); it was left untouched: point --db / CPA_EXPORTER_DB at another file (a new or empty one is initialised)"
    )]
    Foreign { path: PathBuf, why: String },
    #[error(
        "the state database {path} is in use by another cpa-usage-exporter (an exporter or `check`), which holds its lock: two on one database pop batches only one can commit; stop the other one, or give this one its own --db / CPA_EXPORTER_DB"
    )]
    InUse { path: PathBuf },
    #[error("the state database holds a corrupt row ({0})")]
    Corrupt(String),
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Default of [`Limits::series_retirement`]: 30 days.
pub const DEFAULT_SERIES_RETIREMENT: std::time::Duration =
    std::time::Duration::from_secs(30 * 86_400);
/// The write-ahead log is cut back to this size after a checkpoint. SQLite checkpoints it
/// itself every 1000 pages (4 MiB), but a file grown by one large transaction stays that large.
const WAL_SIZE_LIMIT: i64 = 4 * 1024 * 1024;
/// Largest stored counter value (SQLite integers are signed).
const MAX_COUNTER: u64 = i64::MAX as u64;

/// Bounds on what the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Label sets per capped family; more fold into one `__other__` series.
    pub series_per_family: usize,
    /// How many recent `event_id`s are remembered for deduplication.
    pub dedup_window: usize,
    /// A credential's quota gauges are dropped after this long without an observation.
    pub quota_retention: std::time::Duration,
    /// Series of data-derived families not updated for this long are deleted; `None` keeps
    /// them forever. A retired counter that comes back restarts at zero.
    pub series_retirement: Option<std::time::Duration>,
    /// A new series is shown at zero for this long after its creation, so every scraper sees it
    /// start from zero and `rate()` counts its first increment (see [`Stored::shown_at`]).
    /// Zero shows every series at once. The exporter's setting defaults to one minute.
    pub new_series_hold: std::time::Duration,
    /// How far apart (and how long on the wall clock) the attempts of one inbound request may
    /// be; see [`chains`].
    pub failover_window: std::time::Duration,
    /// Open inbound requests kept; beyond it the oldest is finished as it stands.
    pub open_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            series_per_family: 10_000,
            dedup_window: 100_000,
            quota_retention: std::time::Duration::from_secs(24 * 3600),
            series_retirement: Some(DEFAULT_SERIES_RETIREMENT),
            new_series_hold: std::time::Duration::ZERO,
            failover_window: chains::DEFAULT_WINDOW,
            open_requests: chains::DEFAULT_OPEN_LIMIT,
        }
    }
}

/// A committed series: its row id in SQLite, its cumulative value and when it was created.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: i64,
    pub value: Value,
    /// Unix seconds of the commit that created the series; `None` for a series that needs no
    /// hold (created before the hold existed, or initialised at zero at start).
    pub created_at: Option<i64>,
    /// Live exemplars (latency, time to first token, failures): set after a commit, never
    /// written to SQLite, gone with the series when it is retired.
    pub exemplars: Exemplars,
}

/// Two series are equal when what is stored of them is: the live exemplars are not, and a
/// reopened store has none.
impl PartialEq for Stored {
    fn eq(&self, other: &Stored) -> bool {
        (self.id, &self.value, self.created_at) == (other.id, &other.value, other.created_at)
    }
}

impl Stored {
    /// The value `/metrics` shows at `now` (Unix seconds): zero until `hold` has passed since
    /// the series was created, its cumulative value after.
    ///
    /// Prometheus' `rate()` and `increase()` cannot see the increment that brings a series into
    /// existence: a series first scraped at 1 counts 0 until it grows again. Most failure
    /// series are new and never grow, so most failures would be invisible. Showing a new series
    /// at zero first gives every scraper a zero sample to count from; its counts appear `hold`
    /// later, in full. `created_at` has whole seconds, so the hold is counted from the next
    /// second: it lasts between `hold` and `hold` + 1 s.
    pub fn shown_at(&self, now: f64, hold: std::time::Duration) -> Cow<'_, Value> {
        match self.created_at {
            Some(created) if !hold.is_zero() && now < (created + 1) as f64 + hold.as_secs_f64() => {
                Cow::Owned(self.value.zeroed())
            }
            _ => Cow::Borrowed(&self.value),
        }
    }
}

/// The cumulative values, as committed.
#[derive(Debug, Default)]
pub struct State {
    pub families: [BTreeMap<LabelValues, Stored>; Family::COUNT],
    pub last_record_timestamp: Option<f64>,
    /// Latest quota observation per credential.
    pub quota: BTreeMap<String, QuotaObservation>,
    /// Copied from [`Limits`] so readers can hide stale quota without a write.
    pub quota_retention: std::time::Duration,
    /// Configured budgets and their spend (set up by the caller after [`Store::open`]).
    pub budgets: crate::store::budget::Budgets,
    /// Copied from [`Limits`]: how long a new series is shown at zero ([`Stored::shown_at`]).
    pub new_series_hold: std::time::Duration,
    /// The store's clock ([`Store::now`]): the hold is judged on it, as creation times are
    /// written with it.
    pub clock: crate::time::StoreClock,
}

impl State {
    pub fn series_count(&self, family: Family) -> usize {
        self.families[family as usize].len()
    }

    /// Series of each quota gauge family (indexed like [`quota::FAMILIES`]).
    pub fn quota_series(&self) -> [usize; quota::FAMILIES.len()] {
        let mut n = [0; quota::FAMILIES.len()];
        for q in self.quota.values() {
            n[quota::PER_CREDENTIAL] += 1;
            for f in q.fields.keys() {
                n[f.family()] += 1;
            }
        }
        n
    }

    /// Stored series over all families.
    pub fn total_series(&self) -> usize {
        self.families.iter().map(BTreeMap::len).sum()
    }

    /// Forget series the store has retired (see [`Store::retire`]).
    pub fn forget(&mut self, retired: &Retired) {
        for (family, labels) in &retired.series {
            self.families[*family as usize].remove(labels);
        }
    }
}

/// The recent `event_id`s (hashed), owned by the store and so by the drain loop alone: checking
/// a batch against it needs no lock shared with `/metrics`.
#[derive(Debug, Default)]
struct Dedup {
    set: HashSet<u64>,
    order: VecDeque<(i64, u64)>,
}

impl Dedup {
    fn next_seq(&self) -> i64 {
        self.order.back().map_or(1, |(s, _)| s + 1)
    }
}

/// Series deleted by [`Store::retire`], to be forgotten by the in-memory [`State`].
#[derive(Debug, Default)]
pub struct Retired {
    pub series: Vec<(Family, LabelValues)>,
}

/// One series a batch changes: its row id (`None` until a new series is inserted) and new value.
#[derive(Debug)]
struct Write {
    family: Family,
    labels: LabelValues,
    id: Option<i64>,
    value: Value,
    /// Copied from the stored series; set by `commit` for a new one.
    created_at: Option<i64>,
    /// The batch's exemplars of the series (of every label set folded into it), merged into
    /// the stored ones by `apply`, after the commit.
    exemplars: Exemplars,
}

/// The absolute values a batch leads to, computed before the commit and applied after it.
#[derive(Debug, Default)]
pub struct Plan {
    writes: Vec<Write>,
    /// Records folded into the overflow series, per family.
    pub overflowed: [u64; Family::COUNT],
    /// Records whose quota values were not kept because a quota family reached the series
    /// limit, per quota family (indexed like [`quota::FAMILIES`]).
    pub quota_overflowed: [u64; quota::FAMILIES.len()],
    event_ids: Vec<(i64, u64)>,
    last_record_timestamp: Option<f64>,
    /// Merged quota observations to write.
    quota: Vec<(String, QuotaObservation)>,
    /// Observations older than this (Unix seconds) are deleted; set by `commit`.
    quota_cutoff: f64,
    /// Rows of the `meta` table to write with the batch (budget spend).
    pub meta: Vec<(String, String)>,
    /// The budgets' spend once the batch is committed (empty: unchanged).
    spend: Vec<budget::Spend>,
    /// The failover grouping's changes (set by [`Store::plan_batch`]).
    pub chains: Option<chains::ChainPlan>,
}

pub struct Store {
    conn: Connection,
    /// The file's lock, held for the store's life (one exporter per database).
    lock: file::Lock,
    path: PathBuf,
    limits: Limits,
    dedup: Dedup,
    /// The last successful pop: (time, whether written to the database).
    last_pop: Option<(f64, bool)>,
    /// Inbound requests being grouped from their attempts, as committed.
    chains: chains::Chains,
    /// What every time the store writes and compares is read from ([`Store::now`]).
    clock: crate::time::StoreClock,
}

impl Store {
    /// Open (creating and migrating as needed) and load the state.
    pub fn open(path: &Path, limits: Limits) -> Result<(Store, State), StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let file = create_private(path).map_err(|e| open_err(e.into()))?;
        // Before anything is read or popped: a second exporter stops here.
        let lock = file::Lock::take(file, path)?;
        let conn = Connection::open(path).map_err(|e| open_err(e.into()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Nothing is written before the file is known to be ours (or empty).
        claim(&conn, path)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| open_err(e.into()))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        let mut store = Store {
            conn,
            lock,
            path: path.to_owned(),
            limits,
            dedup: Dedup::default(),
            last_pop: None,
            chains: chains::Chains::new(limits.failover_window, limits.open_requests),
            clock: crate::time::StoreClock::default(),
        };
        store.migrate()?;
        store.init_known_series()?;
        let state = store.load()?;
        Ok((store, state))
    }

    /// The store's time, Unix seconds: the time to commit, retire, group attempts and note pops
    /// at. It never goes back, also across a restart (it starts no earlier than the latest
    /// time the database holds), and ignores wall-clock steps ([`crate::time::StoreClock`]).
    pub fn now(&self) -> f64 {
        self.clock.now()
    }

    /// Whether an `event_id` (hashed) was applied within the dedup window.
    pub fn seen(&self, id: u64) -> bool {
        self.dedup.set.contains(&id)
    }

    /// The `event_id`s (hashed) within the dedup window.
    pub fn seen_ids(&self) -> &HashSet<u64> {
        &self.dedup.set
    }

    /// When the last successful pop recorded in the database started (by this process or an
    /// earlier one), Unix seconds.
    pub fn last_pop(&self) -> Option<f64> {
        self.last_pop.map(|(t, _)| t)
    }

    /// Remember a successful pop. It is written to the database at most every few seconds;
    /// [`Store::flush_last_pop`] writes the latest at once.
    pub fn note_pop(&mut self, at: f64) -> Result<(), StoreError> {
        let written = self
            .last_pop
            .filter(|(_, written)| *written)
            .map(|(t, _)| t);
        self.last_pop = Some((at, false));
        if written.is_none_or(|w| at - w >= LAST_POP_EVERY) {
            self.flush_last_pop()?;
        }
        Ok(())
    }

    /// Write the last pop time now (at shutdown).
    pub fn flush_last_pop(&mut self) -> Result<(), StoreError> {
        if let Some((at, false)) = self.last_pop {
            // No fsync for this one (it would slow every idle poll): a process crash keeps it
            // (the write-ahead log is in the OS's hands), only a power loss may lose it.
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
            let written = self.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![META_LAST_POP, at],
            );
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            written?;
            self.last_pop = Some((at, true));
        }
        Ok(())
    }

    /// Inbound requests whose last attempt failed and whose outcome is not known yet.
    pub fn open_requests(&self) -> usize {
        self.chains.open_count()
    }

    /// Whether committing an empty batch at `now` would finish or forget a request.
    pub fn chains_due(&self, now: i64) -> bool {
        self.chains.due(now as f64)
    }

    /// `event_id`s currently remembered.
    pub fn dedup_len(&self) -> usize {
        self.dedup.set.len()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Delete the series of data-derived families that no batch updated since
    /// `now_unix - series_retirement`, and cut the write-ahead log back. The exporter's own
    /// families (records by outcome and reason) have fixed label sets and are never retired.
    /// The caller passes the result to [`State::forget`].
    pub fn retire(&mut self, now_unix: i64) -> Result<Retired, StoreError> {
        let mut retired = Retired::default();
        let Some(after) = self.limits.series_retirement else {
            return Ok(retired);
        };
        let cutoff = now_unix.saturating_sub(i64::try_from(after.as_secs()).unwrap_or(i64::MAX));
        let tx = self.conn.transaction()?;
        {
            let mut stale =
                tx.prepare("SELECT id, family, labels FROM series WHERE updated_at < ?1")?;
            let mut delete = tx.prepare_cached("DELETE FROM series WHERE id = ?1")?;
            let mut rows = stale.query([cutoff])?;
            while let Some(row) = rows.next()? {
                let family_id: String = row.get(1)?;
                let Some(family) = Family::from_id(&family_id).filter(|f| f.is_capped()) else {
                    continue;
                };
                let labels = decode_labels(family, &row.get::<_, String>(2)?)?;
                delete.execute([row.get::<_, i64>(0)?])?;
                retired.series.push((family, labels));
            }
        }
        tx.commit()?;
        self.checkpoint()?;
        Ok(retired)
    }

    /// Copy the write-ahead log into the database and truncate it.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells whether the database's path still names the file opened.
    pub fn file_watch(&self) -> file::FileWatch {
        self.lock.watch()
    }

    /// Bytes on disk: the database file plus its write-ahead log.
    pub fn size_bytes(path: &Path) -> u64 {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        len(path) + len(Path::new(&wal))
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
            });
        }
        // Each step runs in its own transaction together with its version bump.
        for (step, sql) in (1..).zip(MIGRATIONS) {
            if version < step {
                let tx = self.conn.transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", step)?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// Rows at zero for every label value known in advance (the exporter's record outcomes and
    /// invalid reasons), so they are exported from the start and need no hold. Existing rows
    /// are left alone.
    fn init_known_series(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO series (family, labels, value, updated_at) VALUES (?1, ?2, 0, 0)
                 ON CONFLICT (family, labels) DO NOTHING",
            )?;
            let known = [
                (Family::Records, &outcome::ALL[..]),
                (Family::InvalidRecords, &reason::ALL[..]),
            ];
            for (family, values) in known {
                for value in values {
                    let labels: LabelValues = vec![Box::<str>::from(*value)].into_boxed_slice();
                    insert.execute(params![family.id(), encode_labels(family, &labels)])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn load(&mut self) -> Result<State, StoreError> {
        // Times beyond now were written by versions that trusted a record's future timestamp
        // (a record stamped 2099 froze its credential's quota gauges): they count as now, so a
        // later real observation outranks them and the retention drops them in time.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.load_chains()?;
        self.clock = crate::time::StoreClock::starting_at(now.max(self.latest_time()?));
        let mut state = State {
            quota_retention: self.limits.quota_retention,
            new_series_hold: self.limits.new_series_hold,
            clock: self.clock,
            ..State::default()
        };
        let mut stmt = self
            .conn
            .prepare("SELECT id, family, labels, value, hist, created_at FROM series")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let family_id: String = row.get(1)?;
            let Some(family) = Family::from_id(&family_id) else {
                // A family a later version added and this one does not know: leave it be.
                continue;
            };
            let labels = decode_labels(family, &row.get::<_, String>(2)?)?;
            let value =
                match family.kind() {
                    Kind::Counter => Value::Counter(row.get::<_, i64>(3)?.max(0) as u64),
                    Kind::Histogram(bounds) => {
                        let blob: Vec<u8> = row.get(4)?;
                        Value::Histogram(decode_hist(&blob, bounds).ok_or_else(|| {
                            StoreError::Corrupt(format!("histogram of {family_id}"))
                        })?)
                    }
                };
            let created_at = row.get(5)?;
            state.families[family as usize].insert(
                labels,
                Stored {
                    id,
                    value,
                    created_at,
                    exemplars: Exemplars::default(),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare("SELECT seq, id FROM dedup ORDER BY seq")?;
        let ids = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        for id in ids {
            let (seq, id) = id?;
            self.dedup.set.insert(id);
            self.dedup.order.push_back((seq, id));
        }
        state.last_record_timestamp = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [META_LAST_RECORD_TS],
                |r| r.get::<_, f64>(0),
            )
            .optional()?
            .map(|t| t.min(now));
        self.last_pop = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [META_LAST_POP],
                |r| r.get::<_, f64>(0),
            )
            .optional()?
            .filter(|t| *t <= self.clock.now())
            .map(|t| (t, true));
        let mut stmt = self
            .conn
            .prepare("SELECT credential, field, provider, value, observed_at FROM quota")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let Some(field) = Field::from_key(&row.get::<_, String>(1)?) else {
                continue;
            };
            let obs = QuotaObservation {
                provider: row.get(2)?,
                observed_at: row.get::<_, f64>(4)?.min(now),
                fields: [(field, row.get(3)?)].into(),
                records: 0,
            };
            state
                .quota
                .entry(row.get(0)?)
                .and_modify(|q| q.merge(&obs))
                .or_insert(obs);
        }
        Ok(state)
    }

    /// The latest time the store wrote (Unix seconds; 0 for none): the store's clock starts
    /// no earlier. Had the wall clock run fast and been corrected, a series created "in the
    /// future" would be held at zero again, hiding counts already shown (a drop Prometheus
    /// takes for a reset, counting them twice when they reappear).
    fn latest_time(&self) -> Result<f64, StoreError> {
        let series: i64 = self.conn.query_row(
            "SELECT MAX(COALESCE(MAX(updated_at), 0), COALESCE(MAX(created_at), 0)) FROM series",
            [],
            |r| r.get(0),
        )?;
        let last_pop: f64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [META_LAST_POP],
                |r| r.get::<_, f64>(0),
            )
            .optional()?
            .unwrap_or(0.0);
        Ok((series as f64).max(last_pop).max(self.chains.latest()))
    }

    /// The failover grouping's open and recently finished requests.
    fn load_chains(&mut self) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT at, keys FROM finished_requests ORDER BY seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let at: f64 = row.get(0)?;
            let blob: Vec<u8> = row.get(1)?;
            let finished = chains::decode_finished(&blob, at)
                .ok_or_else(|| StoreError::Corrupt("finished_requests".to_owned()))?;
            for (key, f) in finished {
                self.chains.restore_finished(key, f);
            }
        }
        let mut stmt = self.conn.prepare("SELECT key, chain FROM open_requests")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let key = row.get::<_, i64>(0)? as u64;
            let chain = serde_json::from_str(&row.get::<_, String>(1)?)
                .map_err(|e| StoreError::Corrupt(format!("open_requests: {e}")))?;
            self.chains.restore_open(key, chain);
        }
        Ok(())
    }

    /// Everything committing `batch` at `now` writes: its series, the inbound requests its
    /// attempts finish, and the budgets' spend. The drain loop and `check` both commit through
    /// this, so a record counts the same whoever popped it.
    pub fn plan_batch(&self, state: &State, batch: &Batch, now: i64) -> Plan {
        self.plan_batch_at(state, batch, now, now)
    }

    /// [`Store::plan_batch`] at store time `now` ([`Store::now`]) and wall-clock time `wall`:
    /// budget periods are days and months of the calendar, so they read the wall clock.
    pub fn plan_batch_at(&self, state: &State, batch: &Batch, now: i64, wall: i64) -> Plan {
        let (spend, rows) = state.budgets.after(batch, wall);
        let mut chains = self
            .chains
            .plan(&batch.attempts, now as f64, batch.caught_up);
        let inbound = std::mem::take(&mut chains.delta);
        let mut plan = self.plan_with(state, batch, Some(&inbound), Some(wall as f64));
        chains.delta = inbound;
        plan.chains = Some(chains);
        plan.meta = rows;
        plan.spend = spend;
        plan
    }

    /// Work out the absolute values `batch` leads to, folding label sets beyond the cap.
    pub fn plan(&self, state: &State, batch: &Batch) -> Plan {
        self.plan_with(state, batch, None, None)
    }

    /// [`Store::plan`] with further increments (the inbound-request families) besides the batch's.
    /// A stored quota observation later than `wall` (the wall clock now) was timed by a clock
    /// since stepped back: any new observation outranks it (else the gauges would freeze until
    /// the clock caught up).
    fn plan_with(
        &self,
        state: &State,
        batch: &Batch,
        extra: Option<&crate::ingest::Delta>,
        wall: Option<f64>,
    ) -> Plan {
        let mut plan = Plan::default();
        // Index into `plan.writes` of each series touched; folded label sets share one write.
        let mut slots: [HashMap<LabelValues, usize>; Family::COUNT] = Default::default();
        let mut new_series = [0usize; Family::COUNT];
        // Label sets of the tokens and cost families whose records were already counted as
        // folded (one record feeds several token-type series).
        let mut folded_keys: [HashSet<LabelValues>; Family::COUNT] = Default::default();
        // Records per (provider, model, credential, api_key), built only when such a series
        // folds (rare): the requests family counts records under a superset of those labels.
        let mut records_per_key: Option<HashMap<LabelValues, u64>> = None;
        let deltas = batch
            .delta
            .iter()
            .chain(extra.into_iter().flat_map(|d| d.iter()));
        for (family, labels, delta) in deltas {
            let f = family as usize;
            let stored = &state.families[f];
            let is_new = !stored.contains_key(labels) && !slots[f].contains_key(labels);
            let folded;
            let key = if is_new
                && family.is_capped()
                && stored.len() + new_series[f] >= self.limits.series_per_family
            {
                plan.overflowed[f] += match family {
                    // Their values are tokens and nano-USD: count the records behind them.
                    Family::Tokens | Family::Cost => {
                        let key: LabelValues = labels.iter().take(4).cloned().collect();
                        let per_key = records_per_key.get_or_insert_with(|| records_by_key(batch));
                        let n = per_key.get(&key).copied().unwrap_or(0);
                        if folded_keys[f].insert(key) {
                            n
                        } else {
                            0
                        }
                    }
                    _ => records_in(delta),
                };
                folded = fold(family, labels);
                &folded
            } else {
                labels
            };
            let slot = match slots[f].get(key) {
                Some(&i) => i,
                None => {
                    let existing = stored.get(key);
                    new_series[f] += usize::from(existing.is_none());
                    plan.writes.push(Write {
                        family,
                        labels: key.clone(),
                        id: existing.map(|s| s.id),
                        value: existing.map_or_else(|| zero(family), |s| s.value.clone()),
                        created_at: existing.and_then(|s| s.created_at),
                        exemplars: Exemplars::default(),
                    });
                    slots[f].insert(key.clone(), plan.writes.len() - 1);
                    plan.writes.len() - 1
                }
            };
            plan.writes[slot].value.merge(delta);
            // Keyed by the batch's own label set, landing on the series actually written
            // (`__other__` for a folded one).
            if let Some(e) = batch.exemplars.get(family, labels) {
                plan.writes[slot].exemplars.merge(e);
            }
        }
        // Kept within what SQLite stores, so memory and disk agree after a restart.
        for w in &mut plan.writes {
            if let Value::Counter(n) = &mut w.value {
                *n = (*n).min(MAX_COUNTER);
            }
        }
        // Quota gauges are under the series limit too: a new credential, or a new field of a
        // known one, is not kept once its family is full (a gauge cannot be summed into an
        // `__other__` series), and its records are counted as folded.
        let limit = self.limits.series_per_family;
        let mut quota_series = None;
        for (credential, obs) in &batch.quota {
            let series = quota_series.get_or_insert_with(|| state.quota_series());
            let stored = state.quota.get(credential);
            if stored.is_none() {
                if series[quota::PER_CREDENTIAL] >= limit {
                    plan.quota_overflowed[quota::PER_CREDENTIAL] += obs.records;
                    continue;
                }
                series[quota::PER_CREDENTIAL] += 1;
            }
            let mut merged = stored.cloned().unwrap_or_else(|| QuotaObservation {
                fields: BTreeMap::new(),
                ..obs.clone()
            });
            if wall.is_some_and(|wall| merged.observed_at > wall) {
                merged.observed_at = f64::NEG_INFINITY;
            }
            merged.merge(obs);
            let mut refused = [false; quota::FAMILIES.len()];
            merged.fields.retain(|field, _| {
                if stored.is_some_and(|s| s.fields.contains_key(field)) {
                    return true;
                }
                let f = field.family();
                if series[f] >= limit {
                    refused[f] = true;
                    return false;
                }
                series[f] += 1;
                true
            });
            for (f, refused) in refused.into_iter().enumerate() {
                plan.quota_overflowed[f] += if refused { obs.records } else { 0 };
            }
            merged.records = 0;
            plan.quota.push((credential.clone(), merged));
        }
        plan.event_ids = (self.dedup.next_seq()..)
            .zip(batch.event_ids.iter().copied())
            .collect();
        plan.last_record_timestamp =
            match (state.last_record_timestamp, batch.last_record_timestamp) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        plan
    }

    /// Write a plan in one transaction and fill in the ids of new series. On error nothing is
    /// written and `state` is unchanged; the plan can be committed again.
    pub fn commit(&mut self, plan: &mut Plan, now_unix: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut new_ids = Vec::new();
        {
            // Existing series are updated by row id, far cheaper than an upsert on the text key.
            let mut update = tx.prepare_cached(
                "UPDATE series SET value = ?2, hist = ?3, updated_at = ?4 WHERE id = ?1",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO series (family, labels, value, hist, updated_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )?;
            for (i, w) in plan.writes.iter().enumerate() {
                let (value, hist) = match &w.value {
                    Value::Counter(n) => (Some(i64::try_from(*n).unwrap_or(i64::MAX)), None),
                    Value::Histogram(h) => (None, Some(encode_hist(h))),
                };
                match w.id {
                    Some(id) => {
                        update.execute(params![id, value, hist, now_unix])?;
                    }
                    None => {
                        let labels = encode_labels(w.family, &w.labels);
                        insert.execute(params![w.family.id(), labels, value, hist, now_unix])?;
                        new_ids.push((i, tx.last_insert_rowid()));
                    }
                }
            }
            let mut insert_id = tx.prepare_cached("INSERT INTO dedup (seq, id) VALUES (?1, ?2)")?;
            for (seq, id) in &plan.event_ids {
                insert_id.execute(params![seq, *id as i64])?;
            }
            if let Some(&(last_seq, _)) = plan.event_ids.last() {
                let keep_from = last_seq - self.limits.dedup_window as i64;
                tx.execute("DELETE FROM dedup WHERE seq <= ?1", [keep_from])?;
            }
            let mut put_quota = tx.prepare_cached(
                "INSERT INTO quota (credential, field, provider, value, observed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (credential, field) DO UPDATE SET
                 provider = excluded.provider, value = excluded.value, observed_at = excluded.observed_at",
            )?;
            for (credential, q) in &plan.quota {
                for (field, value) in &q.fields {
                    put_quota.execute(params![
                        credential,
                        field.key(),
                        q.provider,
                        value,
                        q.observed_at
                    ])?;
                }
            }
            plan.quota_cutoff = now_unix as f64 - self.limits.quota_retention.as_secs_f64();
            tx.execute(
                "DELETE FROM quota WHERE observed_at < ?1",
                [plan.quota_cutoff],
            )?;
            let mut put_meta = tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?;
            for (key, value) in &plan.meta {
                put_meta.execute(params![key, value])?;
            }
            if let Some(ts) = plan.last_record_timestamp {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![META_LAST_RECORD_TS, ts],
                )?;
            }
            if let Some(c) = &plan.chains {
                write_chains(&tx, c, now_unix)?;
            }
        }
        tx.commit()?;
        for (i, id) in new_ids {
            plan.writes[i].id = Some(id);
            plan.writes[i].created_at = Some(now_unix);
        }
        Ok(())
    }

    /// Text rows of the `meta` table whose key starts with `prefix`.
    pub fn meta_rows(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE substr(key, 1, length(?1)) = ?1")?;
        let rows = stmt.query_map([prefix], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.collect::<Result<_, _>>().map_err(Into::into)
    }

    /// Make the committed plan visible in memory.
    pub fn apply(&mut self, state: &mut State, plan: Plan) {
        for w in plan.writes {
            let id = w.id.unwrap_or_default();
            let family = &mut state.families[w.family as usize];
            match family.get_mut(&w.labels) {
                Some(s) => {
                    s.id = id;
                    s.value = w.value;
                    s.created_at = w.created_at;
                    s.exemplars.merge(&w.exemplars);
                }
                None => {
                    let series = Stored {
                        id,
                        value: w.value,
                        created_at: w.created_at,
                        exemplars: w.exemplars,
                    };
                    family.insert(w.labels, series);
                }
            }
        }
        for (seq, id) in plan.event_ids {
            self.dedup.set.insert(id);
            self.dedup.order.push_back((seq, id));
        }
        while self.dedup.order.len() > self.limits.dedup_window {
            if let Some((_, id)) = self.dedup.order.pop_front() {
                self.dedup.set.remove(&id);
            }
        }
        state.last_record_timestamp = plan.last_record_timestamp;
        state.quota.extend(plan.quota);
        let cutoff = plan.quota_cutoff;
        state.quota.retain(|_, q| q.observed_at >= cutoff);
        state.budgets.set(plan.spend);
        if let Some(c) = plan.chains {
            self.chains.apply(c);
        }
    }

    /// `PRAGMA integrity_check`, for tests and the `check` subcommand.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

/// The failover grouping's changes, in the batch's transaction.
fn write_chains(
    tx: &rusqlite::Transaction<'_>,
    c: &chains::ChainPlan,
    now_unix: i64,
) -> Result<(), StoreError> {
    let mut put = tx.prepare_cached(
        "INSERT INTO open_requests (key, chain) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET chain = excluded.chain",
    )?;
    for (key, chain) in &c.upserts {
        let text = serde_json::to_string(chain)
            .map_err(|e| StoreError::Corrupt(format!("open request: {e}")))?;
        put.execute(params![*key as i64, text])?;
    }
    let mut delete = tx.prepare_cached("DELETE FROM open_requests WHERE key = ?1")?;
    for key in &c.deletes {
        delete.execute([*key as i64])?;
    }
    if !c.finished.is_empty() {
        tx.prepare_cached("INSERT INTO finished_requests (at, keys) VALUES (?1, ?2)")?
            .execute(params![
                now_unix as f64,
                chains::encode_finished(&c.finished)
            ])?;
    }
    if c.forget_before.is_finite() {
        tx.prepare_cached("DELETE FROM finished_requests WHERE at < ?1")?
            .execute([c.forget_before])?;
    }
    Ok(())
}

/// Make sure the database at `path` is ours, and mark it so: a database with our
/// application id, an empty one (a zero-byte file is one), or one an older version created
/// (no id, a schema version it wrote, and only its tables). Anything else is refused before
/// a byte of it changes.
fn claim(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let foreign = |why: String| StoreError::Foreign {
        path: path.to_owned(),
        why,
    };
    // A file that is not SQLite at all fails here, on the first read.
    let id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(|e| foreign(e.to_string()))?;
    if id == APPLICATION_ID {
        return Ok(());
    }
    if id != 0 {
        return Err(foreign(format!("SQLite application_id {id:#x}")));
    }
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let empty = version == 0 && tables.is_empty();
    let older_ours = UNMARKED_VERSIONS.contains(&version)
        && tables.iter().any(|t| t == "series")
        && tables.iter().all(|t| UNMARKED_TABLES.contains(&t.as_str()));
    if !(empty || older_ours) {
        let mut shown: Vec<&str> = tables.iter().map(String::as_str).take(5).collect();
        if tables.len() > shown.len() {
            shown.push("...");
        }
        return Err(foreign(format!(
            "user_version {version}, tables: {}",
            if shown.is_empty() {
                "none".to_owned()
            } else {
                shown.join(", ")
            }
        )));
    }
    conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    Ok(())
}

/// Create the database file with mode 0600 before SQLite does (it would use the umask); the
/// handle carries the file's lock.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
}

fn zero(family: Family) -> Value {
    match family.kind() {
        Kind::Counter => Value::Counter(0),
        Kind::Histogram(bounds) => Value::Histogram(Hist::new(bounds)),
    }
}

/// Records per (provider, model, credential, api_key), the leading labels of the tokens and
/// cost families, summed from the requests family (provider, model, requested_model,
/// credential, api_key, endpoint).
fn records_by_key(batch: &Batch) -> HashMap<LabelValues, u64> {
    let mut out: HashMap<LabelValues, u64> = HashMap::new();
    for (labels, value) in &batch.delta.families[Family::Requests as usize] {
        let key: LabelValues = [0, 1, 3, 4]
            .iter()
            .filter_map(|&i| labels.get(i).cloned())
            .collect();
        *out.entry(key).or_default() += records_in(value);
    }
    out
}

fn records_in(delta: &Value) -> u64 {
    match delta {
        Value::Counter(n) => *n,
        Value::Histogram(h) => h.count,
    }
}

/// The overflow series a label set folds into: every data-derived label reads `__other__`.
fn fold(family: Family, labels: &LabelValues) -> LabelValues {
    family
        .labels()
        .iter()
        .zip(labels.iter())
        .map(|(name, value)| {
            if is_structural_label(name) {
                value.clone()
            } else {
                OVERFLOW_VALUE.into()
            }
        })
        .collect()
}

/// `name=value` pairs joined by U+001F; values were sanitized, so they hold no control characters.
fn encode_labels(family: Family, labels: &LabelValues) -> String {
    let mut out = String::new();
    for (i, (name, value)) in family.labels().iter().zip(labels.iter()).enumerate() {
        if i > 0 {
            out.push('\u{1f}');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

fn decode_labels(family: Family, text: &str) -> Result<LabelValues, StoreError> {
    let pairs: HashMap<&str, &str> = text
        .split('\u{1f}')
        .filter_map(|p| p.split_once('='))
        .collect();
    family
        .labels()
        .iter()
        .map(|name| {
            pairs
                .get(name)
                .map(|v| Box::<str>::from(*v))
                .ok_or_else(|| StoreError::Corrupt(format!("{} lacks label {name}", family.id())))
        })
        .collect()
}

fn encode_hist(h: &Hist) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 8 * h.buckets.len());
    out.extend_from_slice(&h.sum.to_le_bytes());
    out.extend_from_slice(&h.count.to_le_bytes());
    for b in h.buckets.iter() {
        out.extend_from_slice(&b.to_le_bytes());
    }
    out
}

fn decode_hist(blob: &[u8], bounds: &[f64]) -> Option<Hist> {
    let words: Vec<[u8; 8]> = blob
        .chunks(8)
        .map(|c| c.try_into().ok())
        .collect::<Option<_>>()?;
    let (sum, rest) = words.split_first()?;
    let (count, buckets) = rest.split_first()?;
    // Buckets are fixed per schema version; a mismatch means a foreign or damaged row.
    (buckets.len() == bounds.len() + 1).then(|| Hist {
        sum: f64::from_le_bytes(*sum),
        count: u64::from_le_bytes(*count),
        buckets: buckets.iter().map(|b| u64::from_le_bytes(*b)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::from_body;

    fn rec(model: &str, id: Option<&str>) -> String {
        let id = id.map_or(String::new(), |i| format!(r#","event_id":"{i}""#));
        format!(
            r#"{{"timestamp":"2026-08-22T14:39:03Z","provider":"codex","model":"{model}","latency_ms":1200,"ttft_ms":300,
               "tokens":{{"input_tokens":10,"output_tokens":5,"total_tokens":15}}{id}}}"#
        )
    }

    #[test]
    fn a_committed_batch_counts_against_the_budgets_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let key = crate::labels::api_key_label("sk-team-a");
        let budgets = budget::Budgets::new(vec![budget::Budget {
            api_key: key.clone(),
            usd: 10.0,
            period: budget::Period::Month,
        }]);
        let (mut store, mut state) = Store::open(&path, Limits::default()).unwrap();
        state.budgets = budgets.clone();
        let mut batch = Batch::default();
        let labels: LabelValues = ["p", "m", "c", key.as_str()].map(Box::<str>::from).into();
        batch
            .delta
            .add(Family::Cost, labels, Value::Counter(2_000_000_000));
        let now = 1_796_083_200;
        let mut plan = store.plan_batch(&state, &batch, now);
        store.commit(&mut plan, now).unwrap();
        store.apply(&mut state, plan);
        assert_eq!(state.budgets.spent_usd(), [2.0]);
        drop(store);
        let (store, _) = Store::open(&path, Limits::default()).unwrap();
        let mut again = budgets;
        let rows = store.meta_rows(budget::META_PREFIX).unwrap();
        again.restore(rows.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(again.spent_usd(), [2.0]);
    }

    fn ingest(store: &mut Store, state: &mut State, body: &str) {
        let batch = from_body(body.as_bytes(), &crate::pricing::Pricing::embedded(), |h| {
            store.seen(h)
        })
        .unwrap();
        let mut plan = store.plan(state, &batch);
        store.commit(&mut plan, 1).unwrap();
        store.apply(state, plan);
    }

    fn requests(state: &State) -> u64 {
        state.families[Family::Requests as usize]
            .values()
            .map(|s| match s.value {
                Value::Counter(n) => n,
                Value::Histogram(_) => 0,
            })
            .sum()
    }

    /// The request ids of a family's exemplars, per series (first label) and slot.
    fn exemplar_ids(state: &State, family: Family) -> Vec<(String, usize, String)> {
        let mut ids = Vec::new();
        for (labels, stored) in &state.families[family as usize] {
            for slot in 0..32 {
                if let Some(e) = stored.exemplars.get(slot) {
                    ids.push((
                        labels[1].to_string(),
                        slot,
                        e.request_id.as_str().to_owned(),
                    ));
                }
            }
        }
        ids
    }

    #[test]
    fn exemplars_land_on_the_committed_series_even_folded_and_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let limits = Limits {
            series_per_family: 1,
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        let with_id = |model: &str, id: &str, failed: bool| {
            rec(model, None).replace(
                r#""provider""#,
                &format!(r#""request_id":"{id}","failed":{failed},"provider""#),
            )
        };
        // "a" takes the only slot of each family; "b" folds into `__other__`.
        ingest(
            &mut store,
            &mut state,
            &format!(
                "[{},{}]",
                with_id("a", "0000000a", false),
                with_id("b", "0000000b", true)
            ),
        );
        // 1.2 s falls in the 2.0 bucket (index 3). Whichever model took the slot shows its own
        // record; the `__other__` series shows the folded one's.
        let ids = exemplar_ids(&state, Family::Duration);
        assert_eq!(ids.len(), 2, "{ids:?}");
        let (kept, folded) = if ids[1].0 == "a" {
            ("a", "b")
        } else {
            ("b", "a")
        };
        assert_eq!(
            ids,
            [
                ("__other__".to_owned(), 3, format!("0000000{folded}")),
                (kept.to_owned(), 3, format!("0000000{kept}"))
            ]
        );
        assert_eq!(
            exemplar_ids(&state, Family::Failures),
            [("b".to_owned(), 0, "0000000b".to_owned())],
            "the only failure is the first failure series"
        );
        // A later record replaces the bucket's exemplar; a record without an id keeps it.
        ingest(
            &mut store,
            &mut state,
            &format!("[{},{}]", with_id("a", "0000000c", false), rec("a", None)),
        );
        let model = if kept == "a" { "a" } else { "__other__" };
        assert!(exemplar_ids(&state, Family::Duration).contains(&(
            model.to_owned(),
            3,
            "0000000c".to_owned()
        )));
        // Not in SQLite (neither the file nor its log holds an id), and a reopened store has
        // the values without exemplars.
        drop(store);
        for file in [path.clone(), path.with_extension("db-wal")] {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(!bytes.windows(7).any(|w| w == b"0000000"), "{file:?}");
        }
        let (_, reopened) = Store::open(&path, limits).unwrap();
        assert_eq!(reopened.families, state.families);
        assert!(exemplar_ids(&reopened, Family::Duration).is_empty());
    }

    #[test]
    fn state_survives_reopen_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut store, mut state) = Store::open(&path, Limits::default()).unwrap();
        ingest(
            &mut store,
            &mut state,
            &format!("[{},{}]", rec("a", Some("1")), rec("b", None)),
        );
        ingest(
            &mut store,
            &mut state,
            &format!("[{}]", rec("a", Some("1"))),
        );
        drop(store);
        let (store2, reopened) = Store::open(&path, Limits::default()).unwrap();
        assert_eq!(reopened.families, state.families);
        assert_eq!(requests(&reopened), 2);
        assert!(store2.seen(crate::labels::event_id_hash("1")));
        assert_eq!(reopened.last_record_timestamp, Some(1_787_409_543.0));
        assert_eq!(store2.integrity_check().unwrap(), "ok");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn label_sets_beyond_the_cap_fold_into_other_and_sums_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            series_per_family: 3,
            dedup_window: 10,
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&dir.path().join("s.db"), limits).unwrap();
        let body: Vec<String> = (0..10).map(|i| rec(&format!("m{i}"), None)).collect();
        let batch = from_body(
            format!("[{}]", body.join(",")).as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        assert_eq!(plan.overflowed[Family::Requests as usize], 7);
        store.commit(&mut plan, 1).unwrap();
        store.apply(&mut state, plan);
        // 3 real series plus the overflow series.
        assert_eq!(state.series_count(Family::Requests), 4);
        assert_eq!(requests(&state), 10);
        let other = state.families[Family::Requests as usize]
            .keys()
            .filter(|k| k.iter().all(|v| &**v == OVERFLOW_VALUE))
            .count();
        assert_eq!(other, 1);
        // Token types survive folding: the sum over type is still meaningful.
        assert!(state.families[Family::Tokens as usize]
            .keys()
            .any(|k| k[1].as_ref() == OVERFLOW_VALUE && k[4].as_ref() == "input"));
    }

    #[test]
    fn overflow_counts_folded_records_not_tokens_or_nano_usd() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            series_per_family: 3,
            ..Limits::default()
        };
        let (store, state) = Store::open(&dir.path().join("s.db"), limits).unwrap();
        // Ten priced models, two records each, 1000 input tokens per record: one token series
        // and one cost series per model.
        let body: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    r#"{{"timestamp":"2026-08-22T14:39:03Z","provider":"openai","model":"gpt-4o","auth_index":"c{}","tokens":{{"input_tokens":1000,"total_tokens":1000}}}}"#,
                    i % 10
                )
            })
            .collect();
        let batch = from_body(
            format!("[{}]", body.join(",")).as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let plan = store.plan(&state, &batch);
        for family in [Family::Requests, Family::Tokens, Family::Cost] {
            assert_eq!(plan.overflowed[family as usize], 14, "{family:?}");
        }
    }

    #[test]
    fn a_record_stamped_in_the_future_moves_no_gauge_past_now_and_never_freezes_quota() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut store, mut state) = Store::open(&path, Limits::default()).unwrap();
        let quota = |ts: &str, pct: u32| {
            format!(
                r#"[{{"timestamp":"{ts}","provider":"codex","auth_index":"c1","response_headers":{{"x-codex-primary-used-percent":["{pct}"]}}}}]"#
            )
        };
        let used = |state: &State| {
            state.quota["c1"].fields[&Field::UsedRatio(crate::ingest::quota::Window::Primary)]
        };
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        ingest(&mut store, &mut state, &quota("2099-01-01T00:00:00Z", 90));
        let after = before + 5.0;
        assert!(state.last_record_timestamp.unwrap() <= after);
        assert!(state.quota["c1"].observed_at <= after);
        assert_eq!(used(&state), 0.9);
        // A later real observation wins, in memory and after a restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let real = fake_cpa::workload::rfc3339_nano(now);
        ingest(&mut store, &mut state, &quota(&real, 30));
        assert_eq!(used(&state), 0.3);
        drop(store);
        let (_, reopened) = Store::open(&path, Limits::default()).unwrap();
        assert_eq!(used(&reopened), 0.3);
    }

    #[test]
    fn quota_observed_before_the_wall_clock_stepped_back_yields_to_new_observations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (mut store, mut state) = Store::open(&path, Limits::default()).unwrap();
        let wall = crate::time::unix_now();
        let quota = |at: f64, pct: u32| {
            let ts = fake_cpa::workload::rfc3339_nano(at);
            let body = format!(
                r#"[{{"timestamp":"{ts}","provider":"codex","auth_index":"c1","response_headers":{{"x-codex-primary-used-percent":["{pct}"]}}}}]"#
            );
            from_body(
                body.as_bytes(),
                &crate::pricing::Pricing::embedded(),
                |_| false,
            )
            .unwrap()
        };
        let used = |state: &State| {
            state.quota["c1"].fields[&Field::UsedRatio(crate::ingest::quota::Window::Primary)]
        };
        let mut step = |state: &mut State, at: f64, pct: u32| {
            let mut plan = store.plan_batch_at(state, &quota(at, pct), 1, wall as i64 + 2);
            store.commit(&mut plan, 1).unwrap();
            store.apply(state, plan);
        };
        step(&mut state, wall - 10.0, 90);
        // As observed while the clock ran an hour fast; NTP has corrected it since.
        state.quota.get_mut("c1").unwrap().observed_at = wall + 3600.0;
        step(&mut state, wall, 30);
        assert_eq!(used(&state), 0.3, "a new observation wins");
        step(&mut state, wall - 60.0, 10);
        assert_eq!(
            used(&state),
            0.3,
            "ordered by record time again: an older record loses"
        );
    }

    #[test]
    fn future_times_stored_by_older_versions_count_as_now_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let (store, _) = Store::open(&path, Limits::default()).unwrap();
            store
                .conn
                .execute_batch(
                    "INSERT INTO quota VALUES ('c1', 'used_ratio:primary', 'codex', 0.9, 4070908800.0);
                     INSERT INTO meta VALUES ('last_record_timestamp', 4070908800.0);",
                )
                .unwrap();
        }
        let (_, state) = Store::open(&path, Limits::default()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(state.last_record_timestamp.unwrap() <= now);
        assert!(state.quota["c1"].observed_at <= now);
    }

    fn application_id(path: &Path) -> i32 {
        Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn new_and_zero_byte_files_are_initialised_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("zero.db");
        std::fs::write(&zero, b"").unwrap();
        for path in [dir.path().join("new.db"), zero] {
            Store::open(&path, Limits::default()).unwrap();
            assert_eq!(application_id(&path), APPLICATION_ID);
            Store::open(&path, Limits::default()).unwrap();
        }
    }

    #[test]
    fn a_database_an_older_version_created_still_opens_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO series (family, labels, value, updated_at) VALUES ('requests', ?1, 7, 0)",
                ["provider=p\u{1f}model=m\u{1f}requested_model=m\u{1f}credential=c\u{1f}api_key=k\u{1f}endpoint=e"],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let (_, state) = Store::open(&path, Limits::default()).unwrap();
        assert_eq!(requests(&state), 7);
        assert_eq!(application_id(&path), APPLICATION_ID);
    }

    #[test]
    fn another_applications_database_is_refused_untouched_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        type Make<'a> = &'a dyn Fn(&Connection);
        let cases: [(&str, Make<'_>); 4] = [
            ("tables.db", &|c| {
                c.execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('x');")
                    .unwrap()
            }),
            ("other-id.db", &|c| {
                c.pragma_update(None, "application_id", 0x0f0f_0f0f)
                    .unwrap();
                c.execute_batch("CREATE TABLE series (x);").unwrap();
            }),
            // Our table names, but a schema version we never wrote without the id.
            ("lookalike.db", &|c| {
                c.execute_batch(MIGRATIONS[0]).unwrap();
                c.pragma_update(None, "user_version", 7).unwrap();
            }),
            ("versioned.db", &|c| {
                c.pragma_update(None, "user_version", 3).unwrap()
            }),
        ];
        for (name, make) in cases {
            let path = dir.path().join(name);
            make(&Connection::open(&path).unwrap());
            let before = std::fs::read(&path).unwrap();
            let e = Store::open(&path, Limits::default()).err().expect(name);
            assert!(matches!(e, StoreError::Foreign { .. }), "{name}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("left untouched"), "{msg}");
            assert_eq!(std::fs::read(&path).unwrap(), before, "{name} was modified");
            assert!(!dir.path().join(format!("{name}-wal")).exists(), "{name}");
        }
        // Not SQLite at all.
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "my notes, not a database\n".repeat(100)).unwrap();
        let e = Store::open(&path, Limits::default()).err().unwrap();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "my notes, not a database\n".repeat(100)
        );
    }

    #[test]
    fn quota_families_stay_under_the_series_limit_and_count_what_they_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            series_per_family: 4,
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&dir.path().join("s.db"), limits).unwrap();
        // Ten credentials, two records each, each with a primary and a secondary window.
        let body: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    r#"{{"timestamp":"2026-08-22T14:39:03Z","provider":"codex","auth_index":"c{}","response_headers":{{"x-codex-primary-used-percent":["10"],"x-codex-secondary-used-percent":["20"]}}}}"#,
                    i % 10
                )
            })
            .collect();
        let batch = from_body(
            format!("[{}]", body.join(",")).as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        let refused: u64 = plan.quota_overflowed.iter().sum();
        assert!(refused > 0);
        store.commit(&mut plan, 1_787_409_600).unwrap();
        store.apply(&mut state, plan);
        for (family, n) in quota::FAMILIES.iter().zip(state.quota_series()) {
            assert!(n <= 4, "{family}: {n}");
        }
        // Four credentials fit, two windows each: the used-ratio family holds only 4 of their 8
        // series; the rest of the 20 records were refused and counted.
        assert_eq!(state.quota_series()[quota::PER_CREDENTIAL], 4);
        assert_eq!(state.quota_series()[0], 4);
    }

    #[test]
    fn quota_survives_reopen_and_expires_after_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let limits = Limits {
            quota_retention: std::time::Duration::from_secs(3600),
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        let body = r#"[{"timestamp":"2026-08-22T14:39:03Z","provider":"codex","auth_index":"c1",
            "response_headers":{"x-codex-primary-used-percent":["25"],"x-ratelimit-remaining-requests":["9"]}}]"#;
        let batch = from_body(
            body.as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, 1_787_409_600).unwrap();
        store.apply(&mut state, plan);
        assert_eq!(state.quota["c1"].fields.len(), 2);
        drop(store);
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        assert_eq!(state.quota["c1"].fields.len(), 2);
        assert_eq!(state.quota["c1"].provider, "codex");
        // Two hours later, an unrelated batch commits: the stale observation goes.
        let batch = from_body(b"[]", &crate::pricing::Pricing::embedded(), |_| false).unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, 1_787_409_600 + 7200).unwrap();
        store.apply(&mut state, plan);
        assert!(state.quota.is_empty());
        drop(store);
        let (_, state) = Store::open(&path, limits).unwrap();
        assert!(state.quota.is_empty());
    }

    #[test]
    fn stale_series_retire_from_disk_and_memory_but_exporter_families_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let day = 86_400;
        let limits = Limits {
            series_retirement: Some(std::time::Duration::from_secs(30 * day as u64)),
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        let commit_at = |store: &mut Store, state: &mut State, body: &str, now: i64| {
            let batch = from_body(
                body.as_bytes(),
                &crate::pricing::Pricing::embedded(),
                |_| false,
            )
            .unwrap();
            let mut plan = store.plan(state, &batch);
            store.commit(&mut plan, now).unwrap();
            store.apply(state, plan);
        };
        commit_at(
            &mut store,
            &mut state,
            &format!("[{}]", rec("old", None)),
            0,
        );
        commit_at(
            &mut store,
            &mut state,
            &format!("[{}]", rec("new", None)),
            20 * day,
        );
        // Nothing is 30 days old yet.
        assert!(store.retire(29 * day).unwrap().series.is_empty());
        let retired = store.retire(40 * day).unwrap();
        assert!(!retired.series.is_empty());
        assert!(retired
            .series
            .iter()
            .all(|(f, labels)| f.is_capped() && labels.iter().any(|v| &**v == "old")));
        state.forget(&retired);
        let models: Vec<&str> = state.families[Family::Requests as usize]
            .keys()
            .map(|k| &*k[1])
            .collect();
        assert_eq!(models, ["new"]);
        // The exporter's own counters are never retired, however old.
        let all = store.retire(100 * day).unwrap();
        state.forget(&all);
        assert!(state.families[Family::Requests as usize].is_empty());
        assert_eq!(
            state.families[Family::Records as usize].len(),
            outcome::ALL.len(),
            "every outcome stays"
        );
        drop(store);
        let (store, reopened) = Store::open(&path, limits).unwrap();
        assert_eq!(reopened.families, state.families);
        assert_eq!(
            Store::size_bytes(&path),
            std::fs::metadata(&path).unwrap().len(),
            "WAL truncated"
        );
        // `off` retires nothing.
        drop(store);
        let never = Limits {
            series_retirement: None,
            ..limits
        };
        let (mut store, _) = Store::open(&path, never).unwrap();
        assert!(store.retire(i64::MAX).unwrap().series.is_empty());
    }

    #[test]
    fn a_new_series_shows_zero_for_the_hold_then_its_exact_value_even_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let hold = std::time::Duration::from_secs(60);
        let limits = Limits {
            new_series_hold: hold,
            ..Limits::default()
        };
        let requests_shown = |state: &State, now: f64| -> u64 {
            state.families[Family::Requests as usize]
                .values()
                .map(|s| match *s.shown_at(now, state.new_series_hold) {
                    Value::Counter(n) => n,
                    Value::Histogram(_) => 0,
                })
                .sum()
        };
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        let body = format!("[{},{}]", rec("a", None), rec("a", None));
        let batch = from_body(
            body.as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, 1000).unwrap();
        store.apply(&mut state, plan);
        assert_eq!(requests_shown(&state, 1000.5), 0, "new: zero at first");
        assert_eq!(
            requests_shown(&state, 1060.9),
            0,
            "hold counts from the next second"
        );
        assert_eq!(requests_shown(&state, 1061.0), 2, "exact after the hold");
        // Histograms are held the same way, with their buckets.
        let h = state.families[Family::Duration as usize]
            .values()
            .next()
            .unwrap();
        assert_eq!(*h.shown_at(1001.0, hold), h.value.zeroed());
        assert_eq!(*h.shown_at(1061.0, hold), h.value);
        // A restart inside the hold keeps holding: the creation time is on disk.
        drop(store);
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        assert_eq!(requests_shown(&state, 1030.0), 0);
        assert_eq!(requests_shown(&state, 1061.0), 2);
        // An increment of a known series is shown at once; only creation is held.
        let batch = from_body(
            format!("[{}]", rec("a", None)).as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, 2000).unwrap();
        store.apply(&mut state, plan);
        assert_eq!(requests_shown(&state, 2000.0), 3);
        // With the hold off, everything is shown at once.
        assert_eq!(requests_shown(&state, 1000.0), 0);
        let unheld = State {
            new_series_hold: std::time::Duration::ZERO,
            ..state
        };
        assert_eq!(requests_shown(&unheld, 1000.0), 3);
    }

    #[test]
    fn the_store_clock_starts_no_earlier_than_the_times_the_database_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let hold = std::time::Duration::from_secs(60);
        let limits = Limits {
            new_series_hold: hold,
            ..Limits::default()
        };
        let wall = crate::time::unix_now();
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        assert!(
            (store.now() - wall).abs() < 5.0,
            "an empty database: the wall clock"
        );
        // Written while the wall clock ran an hour fast: a series created, then shown after
        // its hold, then a last pop.
        let fast = wall as i64 + 3600;
        let batch = from_body(
            format!("[{}]", rec("a", None)).as_bytes(),
            &crate::pricing::Pricing::embedded(),
            |_| false,
        )
        .unwrap();
        let mut plan = store.plan(&state, &batch);
        store.commit(&mut plan, fast).unwrap();
        store.apply(&mut state, plan);
        store.note_pop(fast as f64 + 120.0).unwrap();
        drop(store);
        // Reopened with the clock corrected: the series is not "in the future", so not held
        // again (a drop to zero and back would count its requests twice).
        let (store, state) = Store::open(&path, limits).unwrap();
        assert!(store.now() >= fast as f64 + 120.0);
        assert!(state.clock.now() >= fast as f64 + 120.0);
        let s = state.families[Family::Requests as usize]
            .values()
            .next()
            .unwrap();
        assert_eq!(*s.shown_at(state.clock.now(), hold), Value::Counter(1));
        assert_eq!(store.last_pop(), Some(fast as f64 + 120.0));
    }

    #[test]
    fn outcomes_and_invalid_reasons_exist_at_zero_from_the_start_without_a_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let limits = Limits {
            new_series_hold: std::time::Duration::from_secs(60),
            ..Limits::default()
        };
        let (store, state) = Store::open(&path, limits).unwrap();
        let values = |family: Family| -> Vec<String> {
            state.families[family as usize]
                .iter()
                .map(|(k, s)| {
                    assert_eq!(s.value, Value::Counter(0));
                    assert_eq!(s.created_at, None, "known in advance: no hold");
                    k[0].to_string()
                })
                .collect()
        };
        let mut reasons: Vec<String> = reason::ALL.iter().map(|r| r.to_string()).collect();
        reasons.sort();
        assert_eq!(values(Family::InvalidRecords), reasons);
        assert_eq!(values(Family::Records).len(), outcome::ALL.len());
        // Opening again neither duplicates nor resets them.
        drop(store);
        let (_, again) = Store::open(&path, limits).unwrap();
        assert_eq!(again.families, state.families);
    }

    #[test]
    fn dedup_window_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let limits = Limits {
            series_per_family: 100,
            dedup_window: 5,
            ..Limits::default()
        };
        let (mut store, mut state) = Store::open(&path, limits).unwrap();
        for i in 0..20 {
            ingest(
                &mut store,
                &mut state,
                &format!("[{}]", rec("a", Some(&i.to_string()))),
            );
        }
        assert_eq!(store.dedup_len(), 5);
        drop(store);
        let (reopened, _) = Store::open(&path, limits).unwrap();
        assert!(reopened.dedup_len() <= 6);
        assert!(reopened.seen(crate::labels::event_id_hash("19")));
    }
}
