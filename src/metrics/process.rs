//! The standard `process_*` metrics, read from `/proc/self` (prometheus-client has none, and the
//! crates that do pin another prometheus-client version). Absent files simply omit a metric.

use super::text::{gauge, Type, Writer};

/// Linux reports CPU times in USER_HZ ticks, which is 100 on every architecture's user ABI.
const TICKS_PER_SECOND: f64 = 100.0;

struct Stat {
    cpu_seconds: f64,
    start_ticks: f64,
    virtual_bytes: f64,
}

fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) / TICKS_PER_SECOND,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
    })
}

fn resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The `process_*` metrics node_exporter's users know from client_golang.
pub fn encode(w: &mut Writer) {
    if let Some(stat) = read_stat() {
        let name = "process_cpu_seconds";
        w.family(
            name,
            "Total user and system CPU time spent in seconds",
            Some("seconds"),
            Type::Counter,
        );
        w.counter(name, &[], stat.cpu_seconds);
        gauge(
            w,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            Some("bytes"),
            stat.virtual_bytes,
        );
        if let Some(boot) = boot_time() {
            let start = boot + stat.start_ticks / TICKS_PER_SECOND;
            gauge(
                w,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                Some("seconds"),
                start,
            );
        }
    }
    if let Some(rss) = resident_bytes() {
        gauge(
            w,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            Some("bytes"),
            rss,
        );
    }
    if let Some(n) = open_fds() {
        gauge(
            w,
            "process_open_fds",
            "Number of open file descriptors",
            None,
            n,
        );
    }
    if let Some(n) = max_fds() {
        gauge(
            w,
            "process_max_fds",
            "Maximum number of open file descriptors",
            None,
            n,
        );
    }
}
