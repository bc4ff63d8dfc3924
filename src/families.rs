//! The persisted metric families: names, help, label names and buckets in one table, so the
//! ingest aggregation, the SQLite store and the `/metrics` renderer cannot disagree; and the
//! names of every other family ([`name`]), so all metric names are in this file.

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

/// Names of the families that are not stored (live, quota, CPA's view, budgets, process): with
/// [`Family::metric_name`], every metric name is in this file. Help texts stay beside the code
/// that writes each family.
pub mod name {
    /// The exporter's own live metrics (reset on restart).
    pub mod live {
        pub const CPA_UP: &str = "cpa_up";
        pub const BUILD_INFO: &str = "cpa_exporter_build_info";
        pub const POLLS: &str = "cpa_exporter_polls";
        pub const POLL_DURATION: &str = "cpa_exporter_poll_duration_seconds";
        pub const SERIES: &str = "cpa_exporter_series";
        pub const SERIES_OVERFLOW: &str = "cpa_exporter_series_overflow";
        pub const STORE_ERRORS: &str = "cpa_exporter_store_errors";
        pub const SERIES_RETIRED: &str = "cpa_exporter_series_retired";
        pub const DRAIN_GAPS: &str = "cpa_exporter_drain_gaps";
        pub const DRAIN_GAP: &str = "cpa_exporter_drain_gap_seconds";
        pub const OPEN_REQUESTS: &str = "cpa_exporter_open_requests";
        pub const REQUESTS_FORCED_CLOSED: &str = "cpa_exporter_requests_forced_closed";
    }
    /// Quota and rate-limit gauges, from the latest response headers per credential.
    pub mod quota {
        pub const USED_RATIO: &str = "cpa_quota_used_ratio";
        pub const WINDOW: &str = "cpa_quota_window_seconds";
        pub const RESET: &str = "cpa_quota_reset_timestamp_seconds";
        pub const REMAINING: &str = "cpa_ratelimit_remaining";
        pub const LIMIT: &str = "cpa_ratelimit_limit";
        pub const LAST_OBSERVED: &str = "cpa_quota_last_observed_timestamp_seconds";
    }
    /// CPA's own state: its build, its usage settings and its credentials.
    pub mod cpa {
        pub const CPA_INFO: &str = "cpa_info";
        pub const STATISTICS_ENABLED: &str = "cpa_usage_statistics_enabled";
        pub const QUEUE_RETENTION: &str = "cpa_usage_queue_retention_seconds";
        pub const CREDENTIAL_INFO: &str = "cpa_credential_info";
        pub const CREDENTIAL_STATUS: &str = "cpa_credential_status";
        pub const CREDENTIAL_UNAVAILABLE: &str = "cpa_credential_unavailable";
        pub const CREDENTIAL_DISABLED: &str = "cpa_credential_disabled";
        pub const CREDENTIAL_NEXT_RETRY: &str = "cpa_credential_next_retry_timestamp_seconds";
        pub const SUBSCRIPTION_END: &str = "cpa_credential_subscription_end_timestamp_seconds";
    }
    /// Per-key budgets and their spend.
    pub mod budget {
        pub const BUDGET: &str = "cpa_budget_usd";
        pub const SPENT: &str = "cpa_budget_spent_usd";
        pub const PERIOD_END: &str = "cpa_budget_period_end_timestamp_seconds";
    }
    /// The process metrics, under client_golang's names.
    pub mod process {
        pub const CPU_SECONDS: &str = "process_cpu_seconds";
        pub const VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
        pub const START_TIME_SECONDS: &str = "process_start_time_seconds";
        pub const RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
        pub const OPEN_FDS: &str = "process_open_fds";
        pub const MAX_FDS: &str = "process_max_fds";
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
