//! The standard `process_*` metrics, read from `/proc/self` with `procfs` (prometheus-client has
//! none, and the crates that do pin another prometheus-client version). What cannot be read
//! simply omits a metric.

use procfs::process::{LimitValue, Process};

use super::text::{gauge, Writer};
use crate::families::meta::process as name;

struct Stat {
    cpu_seconds: f64,
    /// Unix seconds.
    start_time: Option<f64>,
    virtual_bytes: f64,
}

fn myself() -> Option<Process> {
    Process::myself().ok()
}

fn read_stat(process: &Process) -> Option<Stat> {
    let stat = process.stat().ok()?;
    // CPU times are in clock ticks (USER_HZ): procfs asks the system for the rate.
    let ticks = procfs::ticks_per_second() as f64;
    Some(Stat {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        start_time: procfs::boot_time_secs()
            .ok()
            .map(|boot| boot as f64 + stat.starttime as f64 / ticks),
        virtual_bytes: stat.vsize as f64,
    })
}

fn resident_bytes(process: &Process) -> Option<f64> {
    let kb = process.status().ok()?.vmrss?;
    Some(kb as f64 * 1024.0)
}

fn open_fds(process: &Process) -> Option<f64> {
    Some(process.fd_count().ok()? as f64)
}

fn max_fds(process: &Process) -> Option<f64> {
    match process.limits().ok()?.max_open_files.soft_limit {
        LimitValue::Value(n) => Some(n as f64),
        LimitValue::Unlimited => None,
    }
}

/// The `process_*` metrics node_exporter's users know from client_golang.
pub fn encode(w: &mut Writer) {
    let Some(process) = myself() else { return };
    if let Some(stat) = read_stat(&process) {
        w.declare(&name::CPU_SECONDS);
        w.counter(name::CPU_SECONDS.name, &[], stat.cpu_seconds);
        gauge(w, &name::VIRTUAL_MEMORY_BYTES, stat.virtual_bytes);
        if let Some(start) = stat.start_time {
            gauge(w, &name::START_TIME_SECONDS, start);
        }
    }
    if let Some(rss) = resident_bytes(&process) {
        gauge(w, &name::RESIDENT_MEMORY_BYTES, rss);
    }
    if let Some(n) = open_fds(&process) {
        gauge(w, &name::OPEN_FDS, n);
    }
    if let Some(n) = max_fds(&process) {
        gauge(w, &name::MAX_FDS, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::text::Format;

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    }

    #[test]
    fn the_process_metrics_describe_this_process() {
        let mut out = Vec::new();
        encode(&mut Writer {
            out: &mut out,
            format: Format::Text004,
        });
        let text = String::from_utf8(out).expect("utf-8");
        let now = crate::time::unix_now();
        let start = value(&text, "process_start_time_seconds");
        assert!(
            start > now - 3600.0 && start <= now + 1.0,
            "{start} vs {now}"
        );
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
        assert!(value(&text, "process_resident_memory_bytes") > 1e6);
        assert!(value(&text, "process_virtual_memory_bytes") > 1e6);
        assert!(value(&text, "process_open_fds") >= 3.0);
        assert!(value(&text, "process_max_fds") >= value(&text, "process_open_fds"));
    }
}
