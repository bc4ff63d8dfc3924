//! The persisted metric families: names, help, label names and buckets in one table, so the
//! ingest aggregation, the SQLite store and the `/metrics` renderer cannot disagree; and the
//! name, help, unit and type of every other family ([`meta`]), so all of them are in this file.

/// Buckets of `cpa_request_duration_seconds` (upper bounds, seconds; `+Inf` implied).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
    300.0, 600.0,
];

/// Buckets of `cpa_time_to_first_token_seconds` (upper bounds, seconds; `+Inf` implied).
pub const TTFT_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
];

/// Label names. Kept as consts so a rename is one edit.
pub mod label {
    pub const PROVIDER: &str = "provider";
    pub const MODEL: &str = "model";
    pub const REQUESTED_MODEL: &str = "requested_model";
    pub const CREDENTIAL: &str = "credential";
    pub const API_KEY: &str = "api_key";
    pub const ENDPOINT: &str = "endpoint";
    pub const STATUS_CODE: &str = "status_code";
    pub const TYPE: &str = "type";
    pub const OUTCOME: &str = "outcome";
    pub const REASON: &str = "reason";
}

/// The type of a metric family, as `# TYPE` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// A family that is not stored: everything its `# HELP`, `# TYPE` and `# UNIT` lines say.
/// `name` is the OpenMetrics family name: with the unit suffix, without `_total`.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub name: &'static str,
    pub help: &'static str,
    pub unit: Option<&'static str>,
    pub ty: Type,
}

const fn gauge(name: &'static str, help: &'static str) -> Meta {
    Meta {
        name,
        help,
        unit: None,
        ty: Type::Gauge,
    }
}

const fn counter(name: &'static str, help: &'static str) -> Meta {
    Meta {
        name,
        help,
        unit: None,
        ty: Type::Counter,
    }
}

const fn with_unit(meta: Meta, unit: &'static str) -> Meta {
    Meta {
        unit: Some(unit),
        ..meta
    }
}

/// The families that are not stored (live, quota, CPA's view, budgets, process): with
/// [`Family`], every metric's name, help, unit and type is in this file.
pub mod meta {
    use super::{counter, gauge, with_unit, Meta, Type};

    /// The exporter's own live metrics (reset on restart). Their help texts end with a full
    /// stop, as prometheus-client's registry wrote them before the exposition was streamed.
    pub mod live {
        use super::*;
        pub const CPA_UP: Meta = gauge(
            "cpa_up",
            "Whether the last poll of CPA's usage queue succeeded (1) or not (0).",
        );
        pub const POLLS: Meta = counter(
            "cpa_exporter_polls",
            "Polls of CPA's usage queue by result.",
        );
        pub const POLL_DURATION: Meta = Meta {
            name: "cpa_exporter_poll_duration_seconds",
            help: "Duration of one poll of CPA's usage queue, including the commit of its batch.",
            unit: Some("seconds"),
            ty: Type::Histogram,
        };
        pub const SERIES_OVERFLOW: Meta = counter(
            "cpa_exporter_series_overflow",
            "Records whose label set was folded into the __other__ series because the family reached its series limit.",
        );
        pub const STORE_ERRORS: Meta = counter(
            "cpa_exporter_store_errors",
            "Failed commits to the state database (the batch is kept and retried).",
        );
        pub const STORE_HEALTHY: Meta = gauge(
            "cpa_exporter_store_healthy",
            "1 while the state database commits and is still the file at --db; 0 when a commit failed or the file was deleted or replaced (see /readyz).",
        );
        pub const SERIES_RETIRED: Meta = counter(
            "cpa_exporter_series_retired",
            "Series deleted because no record updated them within series-retirement (a returning series restarts at zero).",
        );
        pub const DRAIN_GAPS: Meta = counter(
            "cpa_exporter_drain_gaps",
            "Stretches without a successful pop (between two pops, or across a restart) longer than CPA's queue retention: records queued then expired unseen.",
        );
        pub const DRAIN_GAP: Meta = with_unit(
            counter(
                "cpa_exporter_drain_gap_seconds",
                "Seconds of those stretches beyond CPA's queue retention: records queued in them expired unseen.",
            ),
            "seconds",
        );
        pub const OPEN_REQUESTS: Meta = gauge(
            "cpa_exporter_open_requests",
            "Inbound requests whose last attempt failed, waiting up to failover-window for another attempt before they count as client failures.",
        );
        pub const REQUESTS_FORCED_CLOSED: Meta = counter(
            "cpa_exporter_requests_forced_closed",
            "Open inbound requests finished as client failures without waiting for their window, by reason (limit: too many open; attempts: too many failed attempts).",
        );
        pub const SUBSCRIBED: Meta = gauge(
            "cpa_exporter_subscribed",
            "Whether the exporter is subscribed to CPA's usage channel (1) or not (0); exported with transport subscribe.",
        );
        pub const SUBSCRIPTION_DROPS: Meta = counter(
            "cpa_exporter_subscription_drops",
            "Subscriptions to CPA's usage channel that ended without the exporter ending them (CPA dropped a subscriber 256 messages behind, CPA restarted, or the connection broke).",
        );
        pub const SUBSCRIPTION_GAP: Meta = with_unit(
            counter(
                "cpa_exporter_subscription_gap_seconds",
                "Seconds from the end of such a subscription to the next one: records CPA published meanwhile went to other subscribers only, or (with none) were queued and drained after.",
            ),
            "seconds",
        );
        pub const CREDENTIAL_REFRESHES: Meta = counter(
            "cpa_exporter_credential_refreshes",
            "Refresh notices on CPA's usage channel (its credentials changed); each one has the credentials listing read again.",
        );
        pub const EVENT_LOG_LINES: Meta = counter(
            "cpa_exporter_event_log_lines",
            "Lines written to the event log (one per ingested record, after its batch committed).",
        );
        pub const EVENT_LOG_FAILURES: Meta = counter(
            "cpa_exporter_event_log_failures",
            "Event log lines not written, by reason (queue_full: the writer was behind; write: the output failed).",
        );
    }

    /// The exporter's build and the state of its store.
    pub mod store {
        use super::*;
        pub const BUILD_INFO: Meta = gauge(
            "cpa_exporter_build_info",
            "Build of the exporter; constant 1",
        );
        pub const LAST_SUCCESS: Meta = with_unit(
            gauge(
                "cpa_exporter_last_success_timestamp_seconds",
                "Unix time of the last successful poll of CPA",
            ),
            "seconds",
        );
        pub const STORE_SIZE: Meta = with_unit(
            gauge(
                "cpa_exporter_store_size_bytes",
                "Size of the state database on disk, including its write-ahead log",
            ),
            "bytes",
        );
        pub const LAST_RECORD: Meta = with_unit(
            gauge(
                "cpa_exporter_last_record_timestamp_seconds",
                "Start time of the newest record ingested, Unix seconds",
            ),
            "seconds",
        );
        pub const SERIES: Meta = gauge(
            "cpa_exporter_series",
            "Stored series per family (the series limit applies to these)",
        );
    }

    /// Quota and rate-limit gauges, from the latest response headers per credential.
    pub mod quota {
        use super::*;
        pub const USED_RATIO: Meta = gauge(
            "cpa_quota_used_ratio",
            "Share of the credential's quota window used (0..1), from the latest response headers",
        );
        pub const WINDOW: Meta = with_unit(
            gauge("cpa_quota_window_seconds", "Length of the quota window"),
            "seconds",
        );
        pub const RESET: Meta = with_unit(
            gauge(
                "cpa_quota_reset_timestamp_seconds",
                "When the quota window resets, Unix seconds",
            ),
            "seconds",
        );
        pub const REMAINING: Meta = gauge(
            "cpa_ratelimit_remaining",
            "Remaining rate limit reported by the upstream (x-ratelimit-remaining-*)",
        );
        pub const LIMIT: Meta = gauge(
            "cpa_ratelimit_limit",
            "Rate limit reported by the upstream (x-ratelimit-limit-*)",
        );
        pub const LAST_OBSERVED: Meta = with_unit(
            gauge(
                "cpa_quota_last_observed_timestamp_seconds",
                "When quota headers were last seen for the credential, Unix seconds",
            ),
            "seconds",
        );
    }

    /// CPA's own state: its build, its usage settings and its credentials.
    pub mod cpa {
        use super::*;
        pub const CPA_INFO: Meta = gauge(
            "cpa_info",
            "CPA's build, from its X-CPA-VERSION and X-CPA-COMMIT headers; constant 1",
        );
        pub const STATISTICS_ENABLED: Meta = gauge(
            "cpa_usage_statistics_enabled",
            "Whether CPA's usage-statistics-enabled is on (1); with 0 CPA publishes no usage",
        );
        pub const QUEUE_RETENTION: Meta = with_unit(
            gauge(
                "cpa_usage_queue_retention_seconds",
                "How long CPA keeps a queued usage record (redis-usage-queue-retention-seconds, effective value)",
            ),
            "seconds",
        );
        pub const CREDENTIAL_INFO: Meta = gauge(
            "cpa_credential_info",
            "A credential in CPA's credentials listing, with its display name; constant 1",
        );
        pub const CREDENTIAL_STATUS: Meta = gauge(
            "cpa_credential_status",
            "CPA's status of a credential: 1 for the current one of active, pending, refreshing, error, disabled, unknown",
        );
        pub const CREDENTIAL_UNAVAILABLE: Meta = gauge(
            "cpa_credential_unavailable",
            "Whether CPA holds the credential back (cooldown or quota block)",
        );
        pub const CREDENTIAL_DISABLED: Meta = gauge(
            "cpa_credential_disabled",
            "Whether the credential is disabled in CPA",
        );
        pub const CREDENTIAL_NEXT_RETRY: Meta = with_unit(
            gauge(
                "cpa_credential_next_retry_timestamp_seconds",
                "When CPA will next try a held-back credential, Unix seconds (absent when CPA gives no time)",
            ),
            "seconds",
        );
        pub const SUBSCRIPTION_END: Meta = with_unit(
            gauge(
                "cpa_credential_subscription_end_timestamp_seconds",
                "When the subscription behind the credential ends (codex id_token chatgpt_subscription_active_until), Unix seconds",
            ),
            "seconds",
        );
    }

    /// CPA's own attempt counts per credential, and what the exporter did not see of them.
    pub mod reconcile {
        use super::*;
        pub const CREDENTIAL_ATTEMPTS: Meta = counter(
            "cpa_credential_attempts",
            "Upstream attempts CPA itself counted on the credential, by outcome (success, failed): CPA's in-memory counters, which restart from 0 when CPA restarts",
        );
        pub const UNACCOUNTED: Meta = gauge(
            "cpa_exporter_unaccounted_records",
            "Attempts CPA counted on the credential (one credentials read ago, since the later of CPA's and the exporter's start) that the exporter never counted: records taken by another consumer, expired or dropped",
        );
    }

    /// Per-key budgets and their spend.
    pub mod budget {
        use super::*;
        pub const BUDGET: Meta = gauge(
            "cpa_budget_usd",
            "Configured spend limit of a client API key per UTC day or month (budgets in the config file)",
        );
        pub const SPENT: Meta = gauge(
            "cpa_budget_spent_usd",
            "Estimated spend of the key in the current UTC period, counted from cpa_cost_usd_total's cost since the period began (0 at its start)",
        );
        pub const PERIOD_END: Meta = with_unit(
            gauge(
                "cpa_budget_period_end_timestamp_seconds",
                "When the key's current budget period ends (the spend starts again from 0), Unix seconds",
            ),
            "seconds",
        );
    }

    /// CPA's errors channel: failed upstream attempts and the credential state they carry.
    pub mod errors {
        use super::*;
        pub const CREDENTIAL_ERRORS: Meta = counter(
            "cpa_credential_errors",
            "Failed upstream attempts per credential and upstream status, from CPA's errors channel as they happen (live: starts from zero when the exporter restarts).",
        );
        pub const ERRORS_SUBSCRIBED: Meta = gauge(
            "cpa_exporter_errors_subscribed",
            "Whether the exporter is subscribed to CPA's errors channel (1) or not (0); exported once the usage channel is subscribed too (transport subscribe, or auto once it chose to).",
        );
        pub const QUOTA_RECOVER: Meta = with_unit(
            gauge(
                "cpa_credential_quota_recover_timestamp_seconds",
                "When CPA expects a credential's exceeded quota back, Unix seconds, from its errors channel (absent when no quota is exceeded or the time has passed)",
            ),
            "seconds",
        );
    }

    /// The process metrics, under client_golang's names and help texts.
    pub mod process {
        use super::*;
        pub const CPU_SECONDS: Meta = with_unit(
            counter(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
            ),
            "seconds",
        );
        pub const VIRTUAL_MEMORY_BYTES: Meta = with_unit(
            gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
            ),
            "bytes",
        );
        pub const START_TIME_SECONDS: Meta = with_unit(
            gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
            ),
            "seconds",
        );
        pub const RESIDENT_MEMORY_BYTES: Meta = with_unit(
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            "bytes",
        );
        pub const OPEN_FDS: Meta = gauge("process_open_fds", "Number of open file descriptors");
        pub const MAX_FDS: Meta =
            gauge("process_max_fds", "Maximum number of open file descriptors");
    }
}

/// Cost is stored in nano-USD so persisted sums stay exact integers.
pub const NANO_PER_UNIT: f64 = 1e9;

/// Value written in place of every data-derived label of a series folded by the series cap.
pub const OVERFLOW_VALUE: &str = "__other__";

use label::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    /// Classic histogram with these upper bounds (per-bucket counts stored, `+Inf` last).
    Histogram(&'static [f64]),
}

/// A persisted family. The discriminant doubles as an index into per-family arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Requests = 0,
    Failures,
    Tokens,
    Duration,
    Ttft,
    Records,
    InvalidRecords,
    Cost,
    UnpricedRequests,
    ZeroTokenRequests,
    InboundRequests,
    InboundFailures,
    FailoverAttempts,
}

impl Family {
    pub const ALL: [Family; 13] = [
        Family::Requests,
        Family::Failures,
        Family::InboundRequests,
        Family::InboundFailures,
        Family::FailoverAttempts,
        Family::Tokens,
        Family::Cost,
        Family::UnpricedRequests,
        Family::ZeroTokenRequests,
        Family::Duration,
        Family::Ttft,
        Family::Records,
        Family::InvalidRecords,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Stable identifier used as the `family` label and as the key in SQLite.
    pub fn id(self) -> &'static str {
        match self {
            Family::Requests => "requests",
            Family::Failures => "request_failures",
            Family::Tokens => "tokens",
            Family::Duration => "request_duration_seconds",
            Family::Ttft => "time_to_first_token_seconds",
            Family::Records => "exporter_records",
            Family::InvalidRecords => "exporter_invalid_records",
            Family::Cost => "cost_usd",
            Family::UnpricedRequests => "unpriced_requests",
            Family::ZeroTokenRequests => "zero_token_requests",
            Family::InboundRequests => "inbound_requests",
            Family::InboundFailures => "inbound_request_failures",
            Family::FailoverAttempts => "failover_attempts",
        }
    }

    pub fn from_id(id: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.id() == id)
    }

    /// Metric name as registered with prometheus-client (counters get `_total` appended there).
    pub fn metric_name(self) -> &'static str {
        match self {
            Family::Requests => "cpa_requests",
            Family::Failures => "cpa_request_failures",
            Family::Tokens => "cpa_tokens",
            Family::Duration => "cpa_request_duration_seconds",
            Family::Ttft => "cpa_time_to_first_token_seconds",
            Family::Records => "cpa_exporter_records",
            Family::InvalidRecords => "cpa_exporter_invalid_records",
            Family::Cost => "cpa_cost_usd",
            Family::UnpricedRequests => "cpa_unpriced_requests",
            Family::ZeroTokenRequests => "cpa_zero_token_requests",
            Family::InboundRequests => "cpa_inbound_requests",
            Family::InboundFailures => "cpa_inbound_request_failures",
            Family::FailoverAttempts => "cpa_failover_attempts",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Family::Requests => "Upstream attempts reported by CPA (a client request that fails over across credentials counts once per attempt)",
            Family::Failures => "Failed upstream attempts by HTTP status code",
            Family::Tokens => "Tokens by non-overlapping type (input = uncached input, output = non-reasoning output); the sum over type is the attempt's total",
            Family::Duration => "Attempt latency from start to the end of the response, as reported by CPA",
            Family::Ttft => "Time to the first upstream byte, for attempts where CPA measured it",
            Family::Records => "Queue elements processed by the exporter, by outcome",
                        Family::InvalidRecords => "Queue elements that could not be decoded, by reason",
            Family::Cost => "Estimated upstream cost in USD, from the token buckets and the price table (reasoning priced as output)",
            Family::UnpricedRequests => "Attempts with tokens whose model has no price in the price table, so they add nothing to cpa_cost_usd_total",
            Family::ZeroTokenRequests => "Successful attempts that reported no tokens at all",
            Family::InboundRequests => "Inbound client requests CPA finished, successful or not (the attempts sharing a request_id within failover-window count once), by the first attempt's requested model",
            Family::InboundFailures => "Inbound client requests that failed after all their attempts, by the last attempt's HTTP status code",
            Family::FailoverAttempts => "Failed upstream attempts absorbed by a later successful attempt of the same request (failover), by the failed attempt's route and status code",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Family::Duration => Kind::Histogram(LATENCY_BUCKETS),
            Family::Ttft => Kind::Histogram(TTFT_BUCKETS),
            _ => Kind::Counter,
        }
    }

    /// Label names in stored and rendered order: those of the family's [`set`].
    pub fn labels(self) -> &'static [&'static str] {
        use set::LabelSet;
        match self {
            Family::Requests => set::Requests::NAMES,
            Family::Failures => set::Failures::NAMES,
            Family::Tokens => set::Tokens::NAMES,
            Family::Duration | Family::Ttft => set::Latency::NAMES,
            Family::Records => set::Records::NAMES,
            Family::InvalidRecords => set::InvalidRecords::NAMES,
            Family::Cost => set::Cost::NAMES,
            Family::UnpricedRequests | Family::ZeroTokenRequests => set::ByModel::NAMES,
            Family::InboundRequests => set::InboundRequests::NAMES,
            Family::InboundFailures => set::InboundFailures::NAMES,
            Family::FailoverAttempts => set::FailoverAttempts::NAMES,
        }
    }

    /// Stored counters are integers; a family stored in a smaller unit says how many of them
    /// make one output unit. (Dividing by 1e9 rounds correctly; multiplying by 1e-9 does not.)
    pub fn output_divisor(self) -> Option<f64> {
        match self {
            Family::Cost => Some(NANO_PER_UNIT),
            _ => None,
        }
    }

    /// Families whose label values come from CPA records and therefore need a series cap.
    pub fn is_capped(self) -> bool {
        !matches!(self, Family::Records | Family::InvalidRecords)
    }
}

/// Typed label sets, one per shape of family: values are named fields, so a value cannot land
/// under another label; each set's names and values are written side by side, once.
pub mod set {
    use super::label::*;
    use super::Family;
    use crate::series::LabelValues;

    /// A family's labels as a struct.
    pub trait LabelSet {
        /// Label names, in stored and rendered order.
        const NAMES: &'static [&'static str];
        /// The families that carry exactly these labels.
        const FAMILIES: &'static [Family];
        /// The values, in the order of [`LabelSet::NAMES`].
        fn values(&self) -> LabelValues;
    }

    macro_rules! label_set {
        ($(#[$doc:meta])* $name:ident [$($family:ident),+] { $($field:ident: $label:ident),+ $(,)? }) => {
            $(#[$doc])*
            #[derive(Debug, Clone, Copy)]
            pub struct $name<'a> {
                $(pub $field: &'a str,)+
            }

            impl LabelSet for $name<'_> {
                const NAMES: &'static [&'static str] = &[$($label),+];
                const FAMILIES: &'static [Family] = &[$(Family::$family),+];
                fn values(&self) -> LabelValues {
                    Box::new([$(Box::<str>::from(self.$field)),+])
                }
            }
        };
    }

    label_set! {
        /// `cpa_requests_total`: one upstream attempt's route.
        Requests [Requests] {
            provider: PROVIDER,
            model: MODEL,
            requested_model: REQUESTED_MODEL,
            credential: CREDENTIAL,
            api_key: API_KEY,
            endpoint: ENDPOINT,
        }
    }
    label_set! {
        /// `cpa_request_failures_total`: the route and the status code.
        Failures [Failures] {
            provider: PROVIDER,
            model: MODEL,
            requested_model: REQUESTED_MODEL,
            credential: CREDENTIAL,
            api_key: API_KEY,
            endpoint: ENDPOINT,
            status_code: STATUS_CODE,
        }
    }
    label_set! {
        /// `cpa_tokens_total`.
        Tokens [Tokens] {
            provider: PROVIDER,
            model: MODEL,
            credential: CREDENTIAL,
            api_key: API_KEY,
            token_type: TYPE,
        }
    }
    label_set! {
        /// `cpa_cost_usd_total`.
        Cost [Cost] {
            provider: PROVIDER,
            model: MODEL,
            credential: CREDENTIAL,
            api_key: API_KEY,
        }
    }
    label_set! {
        /// The latency histograms.
        Latency [Duration, Ttft] {
            provider: PROVIDER,
            model: MODEL,
            credential: CREDENTIAL,
        }
    }
    label_set! {
        /// Per-model counters (`cpa_unpriced_requests_total`, `cpa_zero_token_requests_total`).
        ByModel [UnpricedRequests, ZeroTokenRequests] {
            provider: PROVIDER,
            model: MODEL,
        }
    }
    label_set! {
        /// `cpa_inbound_requests_total`: the request as the client made it.
        InboundRequests [InboundRequests] {
            requested_model: REQUESTED_MODEL,
            api_key: API_KEY,
        }
    }
    label_set! {
        /// `cpa_inbound_request_failures_total`: the request and the status the client got.
        InboundFailures [InboundFailures] {
            requested_model: REQUESTED_MODEL,
            api_key: API_KEY,
            status_code: STATUS_CODE,
        }
    }
    label_set! {
        /// `cpa_failover_attempts_total`: the failed attempt's route and status.
        FailoverAttempts [FailoverAttempts] {
            provider: PROVIDER,
            model: MODEL,
            credential: CREDENTIAL,
            status_code: STATUS_CODE,
        }
    }
    label_set! {
        /// `cpa_exporter_records_total`.
        Records [Records] { outcome: OUTCOME }
    }
    label_set! {
        /// `cpa_exporter_invalid_records_total`.
        InvalidRecords [InvalidRecords] { reason: REASON }
    }

    impl<'a> Requests<'a> {
        /// The same route with a status code.
        pub fn failed(&self, status_code: &'a str) -> Failures<'a> {
            Failures {
                provider: self.provider,
                model: self.model,
                requested_model: self.requested_model,
                credential: self.credential,
                api_key: self.api_key,
                endpoint: self.endpoint,
                status_code,
            }
        }
    }
}

/// Labels the exporter itself chooses from a fixed set; they survive overflow folding.
pub fn is_structural_label(name: &str) -> bool {
    matches!(name, TYPE | OUTCOME | REASON)
}

/// `type` values of `cpa_tokens_total`, in the order of [`crate::tokens::Tokens`] buckets.
pub const TOKEN_TYPES: [&str; 6] = [
    "input",
    "cache_read",
    "cache_write",
    "output",
    "reasoning",
    "unclassified",
];

/// `outcome` values of `cpa_exporter_records_total`.
pub mod outcome {
    pub const INGESTED: &str = "ingested";
    pub const DUPLICATE: &str = "duplicate";
    pub const INVALID: &str = "invalid";
    pub const CONTROL: &str = "control";
    /// Every outcome: exported from zero at start, so `rate()` sees the first of each.
    pub const ALL: [&str; 4] = [INGESTED, DUPLICATE, INVALID, CONTROL];
}

/// `reason` values of `cpa_exporter_invalid_records_total`.
pub mod reason {
    /// A JSON-string element whose content is not JSON.
    pub const NOT_JSON: &str = "not_json";
    /// An element (or the content of a string element) that is JSON but not an object.
    pub const NOT_OBJECT: &str = "not_object";
    /// An object with a known field of the wrong JSON type.
    pub const BAD_FIELD: &str = "bad_field";
    /// A token count or latency that is negative, fractional, non-numeric or absurdly large.
    pub const INVALID_NUMBER: &str = "invalid_number";
    /// An element nesting objects and arrays deeper than
    /// [`crate::cpa::split::MAX_ELEMENT_DEPTH`]; CPA's records nest at most 3 deep.
    pub const TOO_DEEP: &str = "too_deep";
    /// An element larger than `max-response-bytes`, skipped unread (the response is streamed,
    /// so only one element is ever held).
    pub const TOO_LARGE: &str = "too_large";
    /// Every reason: exported from zero at start, so `rate()` sees the first of each.
    pub const ALL: [&str; 6] = [
        NOT_JSON,
        NOT_OBJECT,
        BAD_FIELD,
        INVALID_NUMBER,
        TOO_DEEP,
        TOO_LARGE,
    ];
}

#[cfg(test)]
mod tests {
    use super::set::*;
    use super::*;

    fn families_of<L: LabelSet>() -> Vec<(Family, &'static [&'static str])> {
        L::FAMILIES.iter().map(|f| (*f, L::NAMES)).collect()
    }

    #[test]
    fn every_family_has_exactly_one_label_set() {
        let mut claimed: Vec<(Family, &[&str])> = [
            families_of::<Requests>(),
            families_of::<Failures>(),
            families_of::<Tokens>(),
            families_of::<Cost>(),
            families_of::<Latency>(),
            families_of::<ByModel>(),
            families_of::<InboundRequests>(),
            families_of::<InboundFailures>(),
            families_of::<FailoverAttempts>(),
            families_of::<Records>(),
            families_of::<InvalidRecords>(),
        ]
        .concat();
        claimed.sort_by_key(|(f, _)| *f);
        let mut all = Family::ALL.to_vec();
        all.sort();
        assert_eq!(claimed.iter().map(|(f, _)| *f).collect::<Vec<_>>(), all);
        for (family, names) in claimed {
            assert_eq!(family.labels(), names, "{family:?}");
        }
    }

    #[test]
    fn values_follow_the_names() {
        let set = Tokens {
            provider: "p",
            model: "m",
            credential: "c",
            api_key: "k",
            token_type: "input",
        };
        let values = set.values();
        let values: Vec<&str> = values.iter().map(|v| &**v).collect();
        assert_eq!(values, ["p", "m", "c", "k", "input"]);
        assert_eq!(
            Tokens::NAMES,
            ["provider", "model", "credential", "api_key", "type"]
        );
    }
}
