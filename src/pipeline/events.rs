//! The opt-in event log: one JSON line per ingested record, for a log store (Loki, Elastic...),
//! where Prometheus must not hold one series per request.
//!
//! Lines are handed over only after their batch committed, so the log never shows a record the
//! counters do not hold. A writer thread owns the output: a slow disk or a stdout nobody reads
//! never stops the drain loop. Lines that cannot be written are counted by reason
//! (`cpa_exporter_event_log_failures_total`), never silently lost.
//!
//! A line is written whole or not at all: after a short write (a full disk) the file is cut
//! back to its last whole line, so a cut line never runs into the next one. Each line offered
//! is counted once, as written or as failed, never both.
//!
//! A line carries label values as the metrics show them (the client key as its hash or alias,
//! the credential as its display name) and the `request_id`, never the client key, `source`,
//! `fail.body`, the client's address, user agent or other headers: those never reach
//! [`Attempt`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use serde::Serialize;
use tracing::warn;

use crate::families::{NANO_PER_UNIT, TOKEN_TYPES};
use crate::ingest::{Attempt, RequestId};
use crate::metrics::event_log_reason as reason;
use crate::metrics::{LabelOptions, Shared};

/// Where the event log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// A file, rotated by size: `PATH` is the current one, `PATH.1` the one before, up to
    /// `PATH.<keep>`.
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: usize,
    },
}

/// Committed batches waiting for the writer; past this the drain loop drops lines instead of
/// waiting (at the default batch size, up to 64 000 lines, about 25 MB).
pub const QUEUE_BATCHES: usize = 64;

/// One committed batch's attempts, and for each whether it followed a failed attempt of the
/// same inbound request (a failover).
struct Job {
    attempts: Vec<Attempt>,
    failover: Vec<bool>,
}

/// The drain loop's end of the event log.
#[derive(Debug)]
pub struct EventLog {
    /// `None` once dropped, which ends the writer.
    tx: Option<SyncSender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// At shutdown the lines of every committed batch are written before the process exits.
impl Drop for EventLog {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl EventLog {
    /// Open the output (a file that cannot be opened fails here, at start) and start the
    /// writer thread.
    pub fn start(target: Target, shared: Arc<Shared>) -> io::Result<EventLog> {
        let out: Box<dyn LineSink + Send> = match &target {
            Target::Stdout => Box::new(Stream::stdout()?),
            Target::File {
                path,
                max_bytes,
                keep,
            } => Box::new(Rotating::open(path.clone(), *max_bytes, *keep)?),
        };
        shared.live.event_log.enable();
        let (tx, rx) = sync_channel(QUEUE_BATCHES);
        let labels = shared.view.labels.clone();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("event-log".into())
            .spawn(move || write_loop(rx, out, &labels, &writer_shared))?;
        Ok(EventLog {
            tx: Some(tx),
            writer: Some(writer),
            shared,
        })
    }

    /// Hand over a committed batch. Never blocks: a full queue drops the batch's lines and
    /// counts them.
    pub fn committed(&self, attempts: &[Attempt], failover: Vec<bool>) {
        if attempts.is_empty() {
            return;
        }
        let job = Job {
            attempts: attempts.to_vec(),
            failover,
        };
        let Some(tx) = &self.tx else { return };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) = tx.try_send(job) {
            self.shared
                .live
                .event_log
                .failed(reason::QUEUE_FULL, job.attempts.len() as u64);
        }
    }
}

fn write_loop(
    rx: Receiver<Job>,
    mut out: Box<dyn LineSink + Send>,
    labels: &LabelOptions,
    shared: &Shared,
) {
    let mut buf = Vec::new();
    let mut said = false;
    for job in rx {
        buf.clear();
        write_lines(&mut buf, &job.attempts, &job.failover, labels);
        let offered = job.attempts.len() as u64;
        let (kept, error) = match out.write_lines(&buf) {
            Ok(()) => (buf.len(), None),
            Err(Partial { kept, error }) => (kept, Some(error)),
        };
        // Only whole lines are ever kept, so counting newlines counts lines.
        let written = (memchr::memchr_iter(b'\n', &buf[..kept]).count() as u64).min(offered);
        shared.live.event_log.written(written);
        if written < offered {
            shared
                .live
                .event_log
                .failed(reason::WRITE, offered - written);
        }
        if let Some(e) = error {
            if !std::mem::replace(&mut said, true) {
                warn!(
                    lines = offered - written,
                    "cannot write the event log, its lines are dropped (counted in cpa_exporter_event_log_failures_total): {e}"
                );
            }
        }
    }
}

/// A write that failed part way: `kept` bytes at the start of the buffer (whole lines) are in
/// the output, the rest is not.
#[derive(Debug)]
struct Partial {
    kept: usize,
    error: io::Error,
}

impl From<io::Error> for Partial {
    fn from(error: io::Error) -> Partial {
        Partial { kept: 0, error }
    }
}

/// An output that takes whole lines only.
trait LineSink {
    /// Write `buf` (whole lines). On an error, the lines before it may be kept, never part of
    /// one.
    fn write_lines(&mut self, buf: &[u8]) -> Result<(), Partial>;
}

/// Write all of `buf`; on an error, say how many bytes went out before it.
fn write_counted(out: &mut impl Write, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match out.write(&buf[done..]) {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Bytes of the whole lines in `bytes`.
fn whole_lines(bytes: &[u8]) -> usize {
    memchr::memrchr(b'\n', bytes).map_or(0, |i| i + 1)
}

/// Standard output, unbuffered (a copy of its descriptor): a stream cannot be cut back, so a
/// cut line is ended by a newline before the next batch and counted as failed, never joined
/// to the next line.
struct Stream {
    out: File,
    cut: bool,
}

impl Stream {
    fn stdout() -> io::Result<Stream> {
        use std::os::fd::AsFd;
        let fd = io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Stream {
            out: File::from(fd),
            cut: false,
        })
    }
}

impl LineSink for Stream {
    fn write_lines(&mut self, buf: &[u8]) -> Result<(), Partial> {
        if self.cut {
            write_counted(&mut self.out, b"\n").map_err(|(_, e)| Partial::from(e))?;
            self.cut = false;
        }
        write_counted(&mut self.out, buf).map_err(|(done, error)| {
            let kept = whole_lines(&buf[..done]);
            self.cut = kept < done;
            Partial { kept, error }
        })
    }
}

/// The six token buckets, named as `cpa_tokens_total`'s `type` values.
#[derive(Serialize)]
struct TokenFields {
    input: u64,
    cache_read: u64,
    cache_write: u64,
    output: u64,
    reasoning: u64,
    unclassified: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    /// The attempt's start, RFC 3339 UTC with milliseconds.
    time: Option<String>,
    request_id: Option<&'a str>,
    provider: &'a str,
    model: &'a str,
    requested_model: &'a str,
    credential: &'a str,
    api_key: &'a str,
    endpoint: &'a str,
    status_code: u16,
    failed: bool,
    latency_seconds: Option<f64>,
    ttft_seconds: Option<f64>,
    tokens: TokenFields,
    /// `None` when the model has no price.
    cost_usd: Option<f64>,
    failover: bool,
}

/// Append the lines of a batch's attempts to `buf`; `failover` is per attempt (missing ones are
/// `false`).
pub fn write_lines(
    buf: &mut Vec<u8>,
    attempts: &[Attempt],
    failover: &[bool],
    labels: &LabelOptions,
) {
    for (i, a) in attempts.iter().enumerate() {
        line(buf, a, failover.get(i).copied().unwrap_or(false), labels);
    }
}

/// Append one attempt's line (with its newline) to `buf`.
fn line(buf: &mut Vec<u8>, a: &Attempt, failover: bool, labels: &LabelOptions) {
    const _: () = assert!(TOKEN_TYPES.len() == 6);
    let [input, cache_read, cache_write, output, reasoning, unclassified] = a.tokens.0;
    let route = &a.route;
    let credential = labels
        .credential_names
        .get(&*route.credential)
        .map_or(&*route.credential, String::as_str);
    let api_key = labels
        .api_key_aliases
        .get(&*route.api_key)
        .map_or(&*route.api_key, String::as_str);
    let line = Line {
        time: a.started.map(format_time),
        request_id: a.request_id.as_ref().map(RequestId::as_str),
        provider: &route.provider,
        model: &route.model,
        requested_model: &route.requested_model,
        credential,
        api_key,
        endpoint: &route.endpoint,
        status_code: a.status_code,
        failed: a.failed,
        latency_seconds: a.latency_seconds,
        ttft_seconds: a.ttft_seconds,
        tokens: TokenFields {
            input,
            cache_read,
            cache_write,
            output,
            reasoning,
            unclassified,
        },
        cost_usd: a.cost_nano_usd.map(|n| n as f64 / NANO_PER_UNIT),
        failover,
    };
    // Serializing plain strings and numbers into a Vec cannot fail.
    if serde_json::to_writer(&mut *buf, &line).is_ok() {
        buf.push(b'\n');
    }
}

/// Unix seconds as RFC 3339 in UTC with milliseconds: `2026-08-22T14:39:03.512Z`.
fn format_time(t: f64) -> String {
    let ms = (t * 1000.0).round() as i64;
    let (secs, ms) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::time::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// A file rotated by size: before a write would take it past `max_bytes`, `PATH.<keep-1>` moves
/// to `PATH.<keep>` (replacing it), ..., `PATH` to `PATH.1`, and a new `PATH` is started. A
/// batch's lines are written at once, so a line is never split across files.
///
/// Hand-written rather than `file-rotate`: that crate panics when the directory cannot be
/// created and drops writes silently when the file cannot be opened, and every failure here
/// must be counted.
struct Rotating {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
}

impl Rotating {
    fn open(path: PathBuf, max_bytes: u64, keep: usize) -> io::Result<Rotating> {
        let mut r = Rotating {
            path,
            max_bytes,
            keep,
            file: None,
            size: 0,
        };
        r.reopen()?;
        Ok(r)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = open_private(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.reopen()
    }
}

impl LineSink for Rotating {
    fn write_lines(&mut self, buf: &[u8]) -> Result<(), Partial> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        if self.file.is_none() {
            // A failed rotation or write left no file: try again with this batch.
            self.reopen()?;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        // The real end, not `size`: the file is the truth to cut back to.
        let start = file.metadata()?.len();
        match write_counted(file, buf) {
            Ok(()) => {
                self.size = start + buf.len() as u64;
                Ok(())
            }
            Err((done, error)) => {
                let kept = whole_lines(&buf[..done]);
                self.size = start + kept as u64;
                if kept < done && file.set_len(self.size).is_err() {
                    // Cut back when it is opened again.
                    self.file = None;
                }
                Err(Partial { kept, error })
            }
        }
    }
}

#[cfg(test)]
impl Rotating {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.write_lines(buf).map_err(|p| p.error)
    }
}

/// Open for appending, readable by the owner only (lines carry request ids): never through a
/// symbolic link, only a regular file, made private if it was not. A line cut by a crash or a
/// failed write is cut back, so the next one starts on its own.
fn open_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let refused = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} {why}", path.display()),
        )
    };
    let odd = |e: io::Error| match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            refused("is a symbolic link; the event log follows none: point it at the file itself")
        }
        Ok(m) if !m.file_type().is_file() => refused("is not a regular file"),
        _ => e,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        // A FIFO planted at the path must not block the start.
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .map_err(odd)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused("is not a regular file"));
    }
    if meta.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    cut_back_to_last_line(&mut file, meta.len())?;
    Ok(file)
}

/// Cut a file that does not end with a newline back to its last one (to nothing without one).
fn cut_back_to_last_line(file: &mut File, len: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 4096;
    let mut end = len;
    let mut chunk = Vec::new();
    while end > 0 {
        let from = end.saturating_sub(CHUNK);
        chunk.resize((end - from) as usize, 0);
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(());
        }
        if let Some(i) = memchr::memrchr(b'\n', &chunk) {
            return file.set_len(from + i as u64 + 1);
        }
        end = from;
    }
    file.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_with_milliseconds() {
        assert_eq!(format_time(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time(1_787_409_543.512_874),
            "2026-08-22T14:39:03.513Z"
        );
        assert_eq!(format_time(1_787_409_599.999_6), "2026-08-22T14:40:00.000Z");
    }

    #[test]
    fn a_file_rotates_by_size_and_keeps_that_many() {
        let dir = std::env::temp_dir().join(format!("cpa-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.log");
        let mut r = Rotating::open(path.clone(), 25, 2).unwrap();
        for batch in ["a1\na2\n", "b1\nb2\nb3\nb4\nb5\nb6\nb7\n", "c1\n", "d1\n"] {
            r.write_all(batch.as_bytes()).unwrap();
        }
        // A batch is never split: b's 21 bytes did not fit behind a's 6, c fits behind b, d
        // does not (25 bytes), so b and c moved to .1 and a to .2.
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(path.clone()), "d1\n");
        assert_eq!(
            read(dir.join("events.log.1")),
            "b1\nb2\nb3\nb4\nb5\nb6\nb7\nc1\n"
        );
        assert_eq!(read(dir.join("events.log.2")), "a1\na2\n");
        r.write_all(&[b'e'; 30]).unwrap();
        assert!(!dir.join("events.log.3").exists(), "keeps 2");
        assert_eq!(
            read(dir.join("events.log.2")),
            "b1\nb2\nb3\nb4\nb5\nb6\nb7\nc1\n"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod file_rules {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Every open (at start, after a rotation, after a failed write) goes through
    /// `open_private`, so these hold for rotated files too.
    #[test]
    fn links_and_odd_files_are_refused_and_a_file_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "kept\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_private(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(
            (mode(&target), std::fs::read(&target).unwrap()),
            (0o644, b"kept\n".to_vec())
        );

        let e = open_private(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, "a\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_private(&plain).unwrap());
        assert_eq!(mode(&plain), 0o600);
    }

    /// A rotation replaces the link planted at `PATH` while the exporter wrote (a rename moves
    /// the link, never its target), and the new `PATH` is a private regular file.
    #[test]
    fn a_rotation_moves_links_and_starts_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let target = dir.path().join("target");
        std::fs::write(&target, "kept\n").unwrap();
        let mut r = Rotating::open(path.clone(), 25, 2).unwrap();
        r.write_all(b"a1\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        r.write_all(&[b'b'; 29]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"kept\n");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(mode(&path), 0o600);
    }

    /// A cut line from an earlier run (a crash mid-write) is cut back at open, so the next line
    /// starts on its own.
    #[test]
    fn a_cut_line_left_in_the_file_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut r = Rotating::open(path.clone(), 1 << 20, 1).unwrap();
        r.write_all(b"{\"c\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"c\":3}\n"
        );
    }
}
