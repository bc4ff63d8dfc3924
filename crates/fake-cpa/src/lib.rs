//! Simulated CPA: a faithful fake of CPA's management HTTP API ([`FakeCpa`]) and a deterministic
//! generator of realistic usage records with ground truth ([`Workload`]).
//!
//! Used by the `demo` subcommand (traffic without a real CPA) and by integration tests. Fidelity
//! to `shared/cpa/API.md` matters more than convenience: quirks are reproduced on purpose.

#![forbid(unsafe_code)]

pub mod api_keys;
pub mod credentials;
pub mod error_events;
mod pubsub;
mod rng;
pub mod server;
pub mod workload;

use std::f64::consts::TAU;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

pub use api_keys::SimApiKey;
pub use credentials::{SimCredential, SimQuota};
use rng::Rng;
pub use server::{FakeCpa, Fault, Routes, SimConfig, SimStats};
pub use workload::{Expect, Generated, Truth, Workload, WorkloadMix, CLIENT_API_KEYS};

/// Length of the simulated "day": compressed so a demo shows the swing within minutes.
const DAY: Duration = Duration::from_secs(20 * 60);
/// Chance that an arrival starts a burst (an agent loop or a retry storm).
const BURST_P: f64 = 0.01;
/// Mean records per burst (uniform 5..=40).
const BURST_MEAN_LEN: f64 = 22.5;
/// Mean gap between records inside a burst.
const BURST_GAP_SECS: f64 = 0.02;

/// Pushes generated records into `cpa` at about `mean_rate_per_sec` until `stop` becomes true
/// (or its sender is dropped). Arrivals are Poisson with a slow sinusoidal day/night swing and
/// occasional bursts; the base rate is scaled down so bursts keep the long-run mean.
pub async fn run_traffic(
    cpa: FakeCpa,
    seed: u64,
    mean_rate_per_sec: f64,
    mut stop: watch::Receiver<bool>,
) {
    let mut workload = Workload::new(seed, WorkloadMix::default());
    cpa.set_credentials(workload.credentials());
    let mut rng = Rng::new(seed ^ 0x7A3F_FC0D_E5B1_1D2C);
    let started = Instant::now();
    let mut burst_left = 0u32;
    loop {
        let gap = next_gap(
            &mut rng,
            mean_rate_per_sec,
            started.elapsed(),
            &mut burst_left,
        );
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            _ = tokio::time::sleep(gap) => {}
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        cpa.push_raw(&workload.next(now).element_json);
    }
}

/// Time until the next record.
fn next_gap(rng: &mut Rng, mean_rate: f64, elapsed: Duration, burst_left: &mut u32) -> Duration {
    if !(mean_rate.is_finite() && mean_rate > 0.0) {
        return Duration::from_secs(60);
    }
    let secs = if *burst_left > 0 {
        *burst_left -= 1;
        rng.exp(BURST_GAP_SECS)
    } else {
        if rng.chance(BURST_P) {
            *burst_left = rng.range(5, 40) as u32;
        }
        let phase = elapsed.as_secs_f64() / DAY.as_secs_f64() * TAU;
        let rate = mean_rate * (1.0 + 0.6 * phase.sin()) / (1.0 + BURST_P * BURST_MEAN_LEN);
        rng.exp(1.0 / rate)
    };
    Duration::try_from_secs_f64(secs.min(60.0)).unwrap_or(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn traffic_flows_and_stops() {
        let cpa = FakeCpa::start(SimConfig::default()).await.expect("start");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run_traffic(cpa.clone(), 7, 200.0, rx));
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("run_traffic returns after stop")
            .expect("no panic");
        let pushed = cpa.stats().pushed;
        assert!(pushed > 10, "pushed {pushed}");
    }

    #[test]
    fn gap_is_sane_for_odd_rates() {
        let mut rng = Rng::new(1);
        let mut burst = 0;
        for rate in [0.0, -1.0, f64::NAN, 1e-300, 1e9] {
            let gap = next_gap(&mut rng, rate, Duration::ZERO, &mut burst);
            assert!(gap <= Duration::from_secs(60));
        }
    }
}
