//! Waits after consecutive failures of one class, shared by the drain loop and the poller.

use std::time::Duration;

use tokio::sync::watch;

use crate::cpa::AuthCause;

/// Transient faults (unreachable, 5xx, timeouts): 1 s doubling to 30 s.
pub fn transient(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(5);
    Duration::from_secs(secs.min(30))
}

/// Rejected key (401/403): 5 min doubling to 1 h. CPA bans an IP for 30 minutes after 5
/// failed logins, and the ban also locks out the admin UI on that IP, so a wrong key must
/// cost CPA at most a handful of attempts per hour.
pub fn auth(failures: u32) -> Duration {
    let mins = 5u64 << failures.saturating_sub(1).min(4);
    Duration::from_secs(mins.min(60) * 60)
}

/// The wait after a refused key: the auth backoff, or longer while CPA bans this IP.
pub fn auth_wait(cause: &AuthCause, failures: u32) -> Duration {
    let base = auth(failures);
    match cause {
        // Retrying before the ban lifts only extends the outage; add a margin for clock skew.
        AuthCause::IpBanned { retry_after } => {
            base.max(retry_after.unwrap_or(Duration::from_secs(30 * 60)) + Duration::from_secs(30))
        }
        _ => base,
    }
}

/// Returns true when shutdown was requested.
pub async fn sleep_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        // Err means the sender is gone: nobody can ask to stop any more, so stop now.
        _ = shutdown.wait_for(|stop| *stop) => true,
    };
    stopped || *shutdown.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_backoff_grows_from_1s_to_30s() {
        let waits: Vec<u64> = (1..=8).map(|n| transient(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_wrong_key_is_retried_at_most_three_times_in_any_ten_minutes() {
        // Attempt times under the auth schedule, over six hours.
        let mut t = 0u64;
        let mut attempts = vec![0u64];
        for failures in 1.. {
            t += auth(failures).as_secs();
            if t > 6 * 3600 {
                break;
            }
            attempts.push(t);
        }
        for (i, start) in attempts.iter().enumerate() {
            let in_window = attempts[i..]
                .iter()
                .take_while(|a| **a < start + 600)
                .count();
            assert!(
                in_window <= 3,
                "{in_window} attempts within 10 minutes of {start}s"
            );
        }
        // And it keeps trying, so a fixed key is picked up within the hour.
        assert!(attempts.windows(2).all(|w| w[1] - w[0] <= 3600));
    }

    #[test]
    fn a_ban_is_waited_out() {
        let wait = auth_wait(
            &AuthCause::IpBanned {
                retry_after: Some(Duration::from_secs(1781)),
            },
            1,
        );
        assert!(wait >= Duration::from_secs(1781));
    }
}
