//! Popped batch -> aggregated per-series increments.
//!
//! Records are decoded leniently (see [`decode`]), normalized into labels and token buckets, and
//! summed per label set in memory, so the store writes each distinct series once per batch. A bad
//! element is counted with a reason and never spoils the rest of its batch.

pub mod attempt;
pub mod cred_errors;
pub mod decode;
#[cfg(test)]
mod props;
pub mod quota;
pub mod tokens;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::cpa::split;
use crate::families::set::{self, LabelSet};
use crate::families::{outcome, reason, Family, Kind, LATENCY_BUCKETS, TOKEN_TYPES, TTFT_BUCKETS};
use crate::labels;
use crate::pricing::{cost_nano_usd, Price, Pricing};
pub use crate::series::RequestId;
use crate::series::{Exemplar, Exemplars, Hist, LabelValues, Value};
pub use attempt::{request_key, Attempt, Route};
use decode::{Element, Num, RawRecord};
pub use tokens::Tokens;

/// Per-family increments of one batch.
#[derive(Debug, Default)]
pub struct Delta {
    pub families: [HashMap<LabelValues, Value>; Family::COUNT],
}

impl Delta {
    pub fn add(&mut self, family: Family, labels: LabelValues, value: Value) {
        self.families[family as usize]
            .entry(labels)
            .and_modify(|v| v.merge(&value))
            .or_insert(value);
    }

    /// Add `n` to the series of `labels` (nothing when `n` is 0).
    pub fn add_count<L: LabelSet>(&mut self, family: Family, labels: &L, n: u64) {
        debug_assert!(L::FAMILIES.contains(&family), "{family:?}");
        if n > 0 {
            self.add(family, labels.values(), Value::Counter(n));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Family, &LabelValues, &Value)> {
        Family::ALL.into_iter().flat_map(move |f| {
            self.families[f as usize]
                .iter()
                .map(move |(l, v)| (f, l, v))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.families.iter().all(HashMap::is_empty)
    }

    /// Add another batch's increments to these.
    pub fn absorb(&mut self, mut other: Delta) {
        for family in Family::ALL {
            for (labels, value) in std::mem::take(&mut other.families[family as usize]) {
                self.add(family, labels, value);
            }
        }
    }
}

/// The exemplars of one batch: per family and label set (as [`Delta`] keys them), the latest
/// record per bucket or counter series. Only the latency, time-to-first-token and failure
/// families carry them.
#[derive(Debug, Default)]
pub struct BatchExemplars {
    pub families: [HashMap<LabelValues, Exemplars>; Family::COUNT],
}

impl BatchExemplars {
    fn add(&mut self, family: Family, labels: LabelValues, e: &Exemplars) {
        if !e.is_empty() {
            self.families[family as usize]
                .entry(labels)
                .or_default()
                .merge(e);
        }
    }

    pub fn get(&self, family: Family, labels: &LabelValues) -> Option<&Exemplars> {
        self.families[family as usize].get(labels)
    }

    fn absorb(&mut self, other: BatchExemplars) {
        for (family, map) in Family::ALL.into_iter().zip(other.families) {
            for (labels, e) in map {
                self.add(family, labels, &e);
            }
        }
    }
}

/// The outcome of ingesting one popped batch, ready to be committed in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub delta: Delta,
    /// Dedup ids of the records applied, to be remembered with the batch.
    pub event_ids: Vec<u64>,
    /// Elements in the popped array.
    pub elements: usize,
    pub ingested: u64,
    /// Latest attempt start time among the records, Unix seconds.
    pub last_record_timestamp: Option<f64>,
    /// Latest quota observation per credential (`auth_index`).
    pub quota: HashMap<String, QuotaObservation>,
    /// Elements counted as invalid, by reason (also in the delta; kept here for the log line).
    pub invalid: BTreeMap<&'static str, u64>,
    /// Elements whose bytes were not UTF-8 and were decoded with U+FFFD in their place.
    pub repaired_utf8: u64,
    /// The ingested records (not duplicates, not invalid ones), in queue order.
    pub attempts: Vec<Attempt>,
    /// Set by the caller when the pop behind this batch returned less than it asked for: CPA's
    /// queue held nothing older, so an open failover chain may be finished by the wall clock.
    pub caught_up: bool,
    /// Live exemplars, applied to the state only once the batch is committed.
    pub exemplars: BatchExemplars,
}

impl Batch {
    /// Add the outcome of the next part of the same pop.
    pub fn absorb(&mut self, other: Batch) {
        if self.elements == 0 && self.delta.is_empty() {
            *self = other;
            return;
        }
        self.delta.absorb(other.delta);
        self.event_ids.extend(other.event_ids);
        self.elements += other.elements;
        self.ingested += other.ingested;
        self.last_record_timestamp = match (self.last_record_timestamp, other.last_record_timestamp)
        {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (credential, obs) in other.quota {
            match self.quota.entry(credential) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().merge(&obs),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(obs);
                }
            }
        }
        for (reason, n) in other.invalid {
            *self.invalid.entry(reason).or_default() += n;
        }
        self.repaired_utf8 += other.repaired_utf8;
        self.attempts.extend(other.attempts);
        self.caught_up = other.caught_up;
        self.exemplars.absorb(other.exemplars);
    }
}

/// Quota and rate-limit values a credential's responses reported, as of `observed_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaObservation {
    pub provider: String,
    /// Unix seconds when the response carrying the headers arrived.
    pub observed_at: f64,
    pub fields: BTreeMap<quota::Field, f64>,
    /// Records that carried these values in the batch (0 once stored): what the series limit
    /// counts as folded when it refuses them.
    pub records: u64,
}

impl QuotaObservation {
    /// Merge another observation of the same credential: per field, the later value wins.
    pub fn merge(&mut self, other: &QuotaObservation) {
        self.records += other.records;
        if other.observed_at >= self.observed_at {
            self.fields
                .extend(other.fields.iter().map(|(f, v)| (*f, *v)));
            self.observed_at = other.observed_at;
            self.provider.clone_from(&other.provider);
        } else {
            for (f, v) in &other.fields {
                self.fields.entry(*f).or_insert(*v);
            }
        }
    }
}

/// The response body was not a JSON array: nothing in it can be attributed to records.
#[derive(Debug, thiserror::Error)]
#[error("CPA's queue response is not a JSON array: {0}")]
pub struct NotAnArray(#[source] pub split::SplitError);

/// One element's text, ready to decode.
enum Text<'a> {
    Json(Cow<'a, str>),
    TooDeep,
}

impl<'a> Text<'a> {
    /// Bytes that are not UTF-8 are replaced by U+FFFD, as Go's JSON encoder does, so a record
    /// is not lost to one bad byte in a label value.
    fn of(bytes: &'a [u8], depth: usize, repaired: &mut u64) -> Text<'a> {
        if depth > split::MAX_ELEMENT_DEPTH {
            return Text::TooDeep;
        }
        let text = String::from_utf8_lossy(bytes);
        *repaired += u64::from(matches!(text, Cow::Owned(_)));
        Text::Json(text)
    }
}

/// Bytes of elements gathered before they are decoded together: large enough that a batch of
/// CPA-sized records is decoded in one or two goes, small enough to bound memory.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Builds one [`Batch`] from the elements of one pop as they arrive ([`split::Sink`]). Elements
/// are gathered up to [`CHUNK_BYTES`], decoded and folded into the batch, so memory follows the
/// largest element, not the response. Elements over the transport's per-element limit are
/// counted as invalid (`too_large`).
pub struct BatchBuilder<'p, F> {
    pricing: &'p Pricing,
    seen: F,
    /// No record time is later than this, Unix seconds: when the pop started, or (with a
    /// clock) when the elements were decoded, after they arrived.
    now: f64,
    /// Read at each decode, so a record CPA published while the pop was under way is not
    /// clamped to the pop's start (two attempts of one request would then share a start).
    clock: Option<fn() -> f64>,
    arena: Vec<u8>,
    /// Each gathered element: its range in `arena` and its depth when known.
    spans: Vec<(usize, usize, Option<usize>)>,
    batch: Batch,
    /// Dedup ids of the parts already decoded.
    ids: HashSet<u64>,
    oversize: u64,
}

impl<'p, F: Fn(u64) -> bool> BatchBuilder<'p, F> {
    /// `seen` tells whether a dedup id was applied before; `now` is when the pop started.
    pub fn new(pricing: &'p Pricing, now: f64, seen: F) -> Self {
        BatchBuilder {
            pricing,
            seen,
            now,
            clock: None,
            arena: Vec::new(),
            spans: Vec::new(),
            batch: Batch::default(),
            ids: HashSet::new(),
            oversize: 0,
        }
    }

    /// Take the time records are clamped to from `clock` at each decode instead of `now`.
    pub fn with_clock(mut self, clock: fn() -> f64) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Elements received so far (decoded or not).
    pub fn elements(&self) -> usize {
        self.batch.elements + self.spans.len() + self.oversize as usize
    }

    fn flush(&mut self) {
        if self.spans.is_empty() {
            return;
        }
        if let Some(clock) = self.clock {
            self.now = clock().max(self.now);
        }
        let mut repaired = 0;
        let texts: Vec<Text<'_>> = self
            .spans
            .iter()
            .map(|&(from, to, depth)| {
                let bytes = &self.arena[from..to];
                let depth = depth.unwrap_or_else(|| split::nesting(bytes));
                Text::of(bytes, depth, &mut repaired)
            })
            .collect();
        let (seen, ids) = (&self.seen, &self.ids);
        let mut part = ingest_iter(&texts, self.pricing, self.now, |id| {
            seen(id) || ids.contains(&id)
        });
        drop(texts);
        part.repaired_utf8 = repaired;
        self.ids.extend(part.event_ids.iter().copied());
        self.batch.absorb(part);
        self.arena.clear();
        self.spans.clear();
    }

    /// The batch of everything received.
    pub fn finish(mut self) -> Batch {
        self.flush();
        let mut batch = self.batch;
        let n = self.oversize;
        if n > 0 {
            batch.elements += n as usize;
            *batch.invalid.entry(reason::TOO_LARGE).or_default() += n;
            batch.delta.add_count(
                Family::Records,
                &set::Records {
                    outcome: outcome::INVALID,
                },
                n,
            );
            batch.delta.add_count(
                Family::InvalidRecords,
                &set::InvalidRecords {
                    reason: reason::TOO_LARGE,
                },
                n,
            );
        }
        batch
    }
}

impl<F: Fn(u64) -> bool> split::Sink for BatchBuilder<'_, F> {
    fn element(&mut self, bytes: &[u8], depth: Option<usize>) {
        let from = self.arena.len();
        self.arena.extend_from_slice(bytes);
        self.spans.push((from, self.arena.len(), depth));
        if self.arena.len() >= CHUNK_BYTES {
            self.flush();
        }
    }

    fn oversize(&mut self) {
        self.oversize += 1;
    }
}

/// Now, Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Ingest a whole HTTP queue response (a JSON array). `seen` tells whether a dedup id was
/// applied. The drain loop streams instead ([`BatchBuilder`] fed by a [`split::Splitter`]).
pub fn from_body(
    body: &[u8],
    pricing: &Pricing,
    seen: impl Fn(u64) -> bool,
) -> Result<Batch, NotAnArray> {
    let mut builder = BatchBuilder::new(pricing, unix_now(), seen);
    let mut splitter = split::Splitter::new(usize::MAX);
    splitter.feed(body, &mut builder).map_err(NotAnArray)?;
    splitter.finish().map_err(NotAnArray)?;
    Ok(builder.finish())
}

/// Ingest raw payloads, one per element (RESP).
pub fn ingest_elements(
    elements: &[Vec<u8>],
    pricing: &Pricing,
    seen: impl Fn(u64) -> bool,
) -> Batch {
    let mut builder = BatchBuilder::new(pricing, unix_now(), seen);
    for e in elements {
        split::Sink::element(&mut builder, e, None);
    }
    builder.finish()
}

fn ingest_iter<'a>(
    texts: &'a [Text<'a>],
    pricing: &Pricing,
    now: f64,
    seen: impl Fn(u64) -> bool,
) -> Batch {
    let mut agg = Agg::default();
    let mut batch = Batch {
        elements: texts.len(),
        ..Batch::default()
    };
    let mut ids_in_batch = HashSet::new();
    let mut outcomes = [0u64; 4];
    for text in texts {
        let outcome = match text {
            Text::Json(raw) => {
                decode_element_into(raw, now, &mut agg, &mut batch, &mut ids_in_batch, &seen)
            }
            Text::TooDeep => Outcome::Invalid(reason::TOO_DEEP),
        };
        match outcome {
            Outcome::Ingested => outcomes[0] += 1,
            Outcome::Duplicate => outcomes[1] += 1,
            Outcome::Control => outcomes[3] += 1,
            Outcome::Invalid(r) => {
                outcomes[2] += 1;
                *batch.invalid.entry(r).or_default() += 1;
            }
        }
    }
    batch.ingested = outcomes[0];
    // One route (labels, price) per distinct label set, shared by its attempts.
    let mut routes: Vec<Option<(Arc<Route>, Option<&Price>)>> = vec![None; agg.recs.len()];
    let mut recs = std::mem::take(&mut agg.recs);
    for (key, slot) in agg.slots {
        let rec = std::mem::take(&mut recs[slot]);
        routes[slot] = Some(rec.emit(&key, pricing, &mut batch.delta, &mut batch.exemplars));
    }
    batch.attempts = agg
        .pending
        .into_iter()
        .filter_map(|p| {
            let (route, price) = routes.get(p.slot)?.as_ref()?;
            Some(p.attempt(route, *price))
        })
        .collect();
    let names = [
        outcome::INGESTED,
        outcome::DUPLICATE,
        outcome::INVALID,
        outcome::CONTROL,
    ];
    for (name, n) in names.into_iter().zip(outcomes) {
        batch
            .delta
            .add_count(Family::Records, &set::Records { outcome: name }, n);
    }
    for (r, n) in &batch.invalid {
        batch.delta.add_count(
            Family::InvalidRecords,
            &set::InvalidRecords { reason: r },
            *n,
        );
    }
    batch
}

enum Outcome {
    Ingested,
    Duplicate,
    Control,
    Invalid(&'static str),
}

/// The records of a part, summed per label set, and each record's own figures in queue order.
#[derive(Default)]
struct Agg<'a> {
    /// Index into `recs` of each label set.
    slots: HashMap<RecKey<'a>, usize>,
    recs: Vec<RecAgg>,
    pending: Vec<Pending>,
}

/// An attempt whose labels are resolved once its batch part is summed.
struct Pending {
    slot: usize,
    started: Option<f64>,
    request_id: Option<RequestId>,
    request_key: Option<u64>,
    obs: Observation,
}

impl Pending {
    fn attempt(self, route: &Arc<Route>, price: Option<&Price>) -> Attempt {
        let o = self.obs;
        Attempt {
            started: self.started,
            request_id: self.request_id,
            request_key: self.request_key,
            route: Arc::clone(route),
            status_code: o.failed_status.unwrap_or(200),
            failed: o.failed_status.is_some(),
            latency_seconds: o.latency_seconds,
            ttft_seconds: o.ttft_seconds,
            tokens: o.tokens,
            cost_nano_usd: price.map(|p| cost_nano_usd(p, &o.tokens)),
        }
    }
}

fn decode_element_into<'a>(
    raw: &'a str,
    now: f64,
    agg: &mut Agg<'a>,
    batch: &mut Batch,
    ids_in_batch: &mut HashSet<u64>,
    seen: &impl Fn(u64) -> bool,
) -> Outcome {
    let mut rec = match decode::decode_element(raw) {
        Element::Usage(rec) => rec,
        Element::Control => return Outcome::Control,
        Element::Invalid(r) => return Outcome::Invalid(r),
    };
    let Ok(mut obs) = Observation::of(&rec) else {
        return Outcome::Invalid(reason::INVALID_NUMBER);
    };
    if let Some(id) = rec.event_id.as_deref().filter(|id| !id.is_empty()) {
        let h = labels::event_id_hash(id);
        if seen(h) || !ids_in_batch.insert(h) {
            return Outcome::Duplicate;
        }
        batch.event_ids.push(h);
    }
    // A record cannot have started after it was popped: a later time (a wrong clock, or a
    // record stamped 2099) counts as the time of the pop, so it never outranks a real one.
    let started = rec
        .timestamp
        .as_deref()
        .and_then(crate::time::parse_rfc3339)
        .map(|t| t.min(now));
    if let Some(ts) = started {
        batch.last_record_timestamp = Some(batch.last_record_timestamp.map_or(ts, |t| t.max(ts)));
    }
    obs.exemplar = exemplar_of(&rec, started, &obs, now);
    if !rec.response_headers.is_empty() {
        note_quota(&rec, started, now, &obs, &mut batch.quota);
    }
    let (request_id, request_key) = match rec.request_id.as_deref().filter(|id| !id.is_empty()) {
        Some(id) => (
            RequestId::parse(id),
            Some(request_key(rec.api_key.as_deref().unwrap_or_default(), id)),
        ),
        None => (None, None),
    };
    let key = RecKey::take(&mut rec);
    let slot = match agg.slots.get(&key) {
        Some(&slot) => slot,
        None => {
            agg.recs.push(RecAgg::default());
            agg.slots.insert(key, agg.recs.len() - 1);
            agg.recs.len() - 1
        }
    };
    agg.recs[slot].add(&obs);
    agg.pending.push(Pending {
        slot,
        started,
        request_id,
        request_key,
        obs,
    });
    Outcome::Ingested
}

/// The record's exemplar identity: its `request_id` (when CPA's hex form) and when it ended.
/// The end (start + latency, never after the pop) is when the record was counted, so the
/// exemplar's dot sits where the graph's rate rises, and a long request is not drawn minutes
/// before it was observed; CPA's request log still finds it by id.
fn exemplar_of(
    rec: &RawRecord<'_>,
    started: Option<f64>,
    obs: &Observation,
    now: f64,
) -> Option<(RequestId, f64)> {
    let id = RequestId::parse(rec.request_id.as_deref()?)?;
    let ended = (started? + obs.latency_seconds.unwrap_or(0.0)).min(now);
    Some((id, ended))
}

/// Record a credential's quota headers. They arrived with the first byte of the response.
fn note_quota(
    rec: &RawRecord<'_>,
    started: Option<f64>,
    now: f64,
    obs: &Observation,
    quota: &mut HashMap<String, QuotaObservation>,
) {
    let Some(credential) = rec.auth_index.as_deref().filter(|c| !c.is_empty()) else {
        return;
    };
    let Some(started) = started else {
        return;
    };
    let observed_at = (started + obs.ttft_seconds.or(obs.latency_seconds).unwrap_or(0.0)).min(now);
    let provider = rec
        .provider
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or("unknown");
    let provider = labels::sanitize(provider);
    let credential = labels::sanitize(credential);
    // Most records of a batch update a credential already seen in it: merge in place,
    // allocating nothing.
    if let Some(q) = quota.get_mut(&*credential) {
        let mut any = false;
        let later = observed_at >= q.observed_at;
        rec.response_headers
            .for_each_field(observed_at, |field, v| {
                any = true;
                if later {
                    q.fields.insert(field, v);
                } else {
                    q.fields.entry(field).or_insert(v);
                }
            });
        if any {
            q.records += 1;
            if later {
                q.observed_at = observed_at;
                if q.provider != *provider {
                    q.provider = provider.into_owned();
                }
            }
        }
        return;
    }
    let fields = rec.response_headers.fields(observed_at);
    if fields.is_empty() {
        return;
    }
    let new = QuotaObservation {
        provider: provider.into_owned(),
        observed_at,
        fields,
        records: 1,
    };
    quota.insert(credential.into_owned(), new);
}

/// What one usage record contributes besides its labels.
struct Observation {
    failed_status: Option<u16>,
    tokens: Tokens,
    latency_seconds: Option<f64>,
    ttft_seconds: Option<f64>,
    /// Set once the record's time is known ([`exemplar_of`]).
    exemplar: Option<(RequestId, f64)>,
}

impl Observation {
    fn of(rec: &RawRecord<'_>) -> Result<Observation, tokens::InvalidNumber> {
        let num = |v: Num| v.0.ok_or(tokens::InvalidNumber);
        let failed_status = if rec.failed == Some(true) {
            let code = rec.fail.as_ref().map_or(Ok(0), |f| num(f.status_code))?;
            // CPA reports 500 when it does not know the status; anything non-HTTP is unknown too.
            Some(
                u16::try_from(code)
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .unwrap_or(500),
            )
        } else {
            None
        };
        let latency_seconds = rec
            .latency_ms
            .map(num)
            .transpose()?
            .map(|ms| ms as f64 / 1000.0);
        let ttft = num(rec.ttft_ms)?;
        Ok(Observation {
            failed_status,
            tokens: tokens::account(rec)?,
            latency_seconds,
            // 0 means "not measured" (and every record before v7.1.24).
            ttft_seconds: (ttft > 0).then(|| ttft as f64 / 1000.0),
            exemplar: None,
        })
    }
}

/// The label-bearing fields of a record, borrowed from the batch buffer where possible.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RecKey<'a> {
    provider: Cow<'a, str>,
    model: Cow<'a, str>,
    requested_model: Cow<'a, str>,
    credential: Cow<'a, str>,
    /// The client's key in plaintext; hashed once per distinct key when the batch is emitted.
    api_key: Cow<'a, str>,
    endpoint: Cow<'a, str>,
}

fn or_default<'a>(v: Option<Cow<'a, str>>, default: &'static str) -> Cow<'a, str> {
    v.filter(|s| !s.is_empty())
        .unwrap_or(Cow::Borrowed(default))
}

impl<'a> RecKey<'a> {
    fn take(rec: &mut RawRecord<'a>) -> RecKey<'a> {
        let model = or_default(rec.model.take(), "unknown");
        let requested_model = rec
            .alias
            .take()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| model.clone());
        RecKey {
            provider: or_default(rec.provider.take(), "unknown"),
            model,
            requested_model,
            credential: or_default(rec.auth_index.take(), "none"),
            api_key: rec.api_key.take().unwrap_or_default(),
            endpoint: or_default(rec.endpoint.take(), "unknown"),
        }
    }
}

#[derive(Default)]
struct RecAgg {
    requests: u64,
    /// Attempts that reported tokens (the ones a missing price leaves uncosted).
    with_tokens: u64,
    /// Successful attempts that reported no tokens.
    zero_token_successes: u64,
    failures: Vec<(u16, u64)>,
    tokens: [u64; 6],
    latency: Option<Hist>,
    ttft: Option<Hist>,
    exemplars: RecExemplars,
}

/// The latest record per bucket and per failure code of one [`RecKey`].
#[derive(Default)]
struct RecExemplars {
    latency: Exemplars,
    ttft: Exemplars,
    failures: Vec<(u16, Exemplars)>,
}

impl RecExemplars {
    fn add(&mut self, o: &Observation, (request_id, time): (RequestId, f64)) {
        let at = |value| Exemplar {
            request_id,
            time,
            value,
        };
        if let Some(v) = o.latency_seconds {
            self.latency.note_observation(LATENCY_BUCKETS, at(v));
        }
        if let Some(v) = o.ttft_seconds {
            self.ttft.note_observation(TTFT_BUCKETS, at(v));
        }
        if let Some(code) = o.failed_status {
            let i = match self.failures.iter().position(|(c, _)| *c == code) {
                Some(i) => i,
                None => {
                    self.failures.push((code, Exemplars::default()));
                    self.failures.len() - 1
                }
            };
            self.failures[i].1.note_counter(at(1.0));
        }
    }
}

fn observe(hist: &mut Option<Hist>, bounds: &[f64], v: f64) {
    hist.get_or_insert_with(|| Hist::new(bounds))
        .observe(bounds, v);
}

impl RecAgg {
    fn add(&mut self, o: &Observation) {
        self.requests += 1;
        if o.tokens.total() > 0 {
            self.with_tokens += 1;
        } else if o.failed_status.is_none() {
            self.zero_token_successes += 1;
        }
        if let Some(code) = o.failed_status {
            match self.failures.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => self.failures.push((code, 1)),
            }
        }
        // Each count is at most `decode::MAX_NUMBER`, but a batch may hold 100 000 of them.
        for (sum, t) in self.tokens.iter_mut().zip(o.tokens.0) {
            *sum = sum.saturating_add(t);
        }
        if let Some(v) = o.latency_seconds {
            observe(&mut self.latency, LATENCY_BUCKETS, v);
        }
        if let Some(v) = o.ttft_seconds {
            observe(&mut self.ttft, TTFT_BUCKETS, v);
        }
        if let Some(e) = o.exemplar {
            self.exemplars.add(o, e);
        }
    }

    /// Project the record-level aggregate onto every family's label set; the route's sanitized
    /// labels and price are returned for the attempts.
    fn emit<'p>(
        self,
        key: &RecKey<'_>,
        pricing: &'p Pricing,
        delta: &mut Delta,
        exemplars: &mut BatchExemplars,
    ) -> (Arc<Route>, Option<&'p Price>) {
        let api_key = if key.api_key.is_empty() {
            "none".to_owned()
        } else {
            labels::api_key_label(&key.api_key)
        };
        let s = labels::sanitize;
        let (provider, model, requested, credential, endpoint) = (
            s(&key.provider),
            s(&key.model),
            s(&key.requested_model),
            s(&key.credential),
            s(&key.endpoint),
        );
        let requests = set::Requests {
            provider: &provider,
            model: &model,
            requested_model: &requested,
            credential: &credential,
            api_key: &api_key,
            endpoint: &endpoint,
        };
        delta.add_count(Family::Requests, &requests, self.requests);
        for (code, n) in self.failures {
            let code_text = code.to_string();
            let failed = requests.failed(&code_text);
            delta.add_count(Family::Failures, &failed, n);
            if let Some((_, e)) = self.exemplars.failures.iter().find(|(c, _)| *c == code) {
                exemplars.add(Family::Failures, failed.values(), e);
            }
        }
        let by_model = set::ByModel {
            provider: &provider,
            model: &model,
        };
        // Cost is linear in tokens, so pricing the summed buckets equals summing per record
        // (up to one nano-USD of rounding per series and batch).
        let price = pricing.lookup(&key.model, &key.requested_model);
        match price {
            Some(price) => {
                let nano = cost_nano_usd(price, &Tokens(self.tokens));
                let cost = set::Cost {
                    provider: &provider,
                    model: &model,
                    credential: &credential,
                    api_key: &api_key,
                };
                delta.add_count(Family::Cost, &cost, nano);
            }
            None => delta.add_count(Family::UnpricedRequests, &by_model, self.with_tokens),
        }
        delta.add_count(
            Family::ZeroTokenRequests,
            &by_model,
            self.zero_token_successes,
        );
        for (token_type, n) in TOKEN_TYPES.into_iter().zip(self.tokens) {
            let tokens = set::Tokens {
                provider: &provider,
                model: &model,
                credential: &credential,
                api_key: &api_key,
                token_type,
            };
            delta.add_count(Family::Tokens, &tokens, n);
        }
        let latency = set::Latency {
            provider: &provider,
            model: &model,
            credential: &credential,
        };
        let ex = self.exemplars;
        for (family, hist, ex) in [
            (Family::Duration, self.latency, ex.latency),
            (Family::Ttft, self.ttft, ex.ttft),
        ] {
            if let Some(h) = hist {
                debug_assert!(matches!(family.kind(), Kind::Histogram(_)));
                if !ex.is_empty() {
                    exemplars.add(family, latency.values(), &ex);
                }
                delta.add(family, latency.values(), Value::Histogram(h));
            }
        }
        let route = Route {
            provider: provider.into(),
            model: model.into(),
            requested_model: requested.into(),
            credential: credential.into(),
            api_key: api_key.into(),
            endpoint: endpoint.into(),
        };
        (Arc::new(route), price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_labels(values: &[&str]) -> LabelValues {
        values.iter().map(|v| Box::<str>::from(*v)).collect()
    }

    fn counter(batch: &Batch, family: Family, labels: &[&str]) -> u64 {
        match batch.delta.families[family as usize].get(&to_labels(labels)) {
            Some(Value::Counter(n)) => *n,
            None => 0,
            Some(other) => panic!("not a counter: {other:?}"),
        }
    }

    const REC: &str = r#"{"timestamp":"2026-08-22T14:39:03.512874113Z","latency_ms":8421,"ttft_ms":912,
        "source":"alice@example.com","auth_index":"3f9c2a7d1b4e8c60","client_ip":"203.0.113.7",
        "tokens":{"input_tokens":12034,"output_tokens":845,"reasoning_tokens":512,"cached_tokens":11008,
          "cache_read_tokens":11008,"cache_creation_tokens":0,"total_tokens":12879},
        "failed":false,"fail":{"status_code":200,"body":""},"accounting_version":2,
        "token_breakdown":{"schema_version":2,"quality":"complete","total_tokens":12879,
          "input":{"total_tokens":12034,"uncached_tokens":1026,"cache_read_tokens":11008,"cache_write_tokens":0},
          "output":{"total_tokens":845,"non_reasoning_tokens":333,"reasoning_tokens":512},"unclassified_tokens":0},
        "provider":"codex","executor_type":"CodexExecutor","model":"gpt-5.4","alias":"gpt-5.4-high",
        "endpoint":"POST /v1/responses","auth_type":"oauth","api_key":"sk-client-key-1","request_id":"a1b2c3d4"}"#;

    #[test]
    fn a_batch_is_summed_per_series_and_bad_elements_do_not_spoil_it() {
        let failed = REC
            .replace(r#""failed":false"#, r#""failed":true"#)
            .replace(r#""status_code":200"#, r#""status_code":429"#);
        let body = format!(
            r#"[{REC},{failed},"garbage",{{"refresh":true}},7,{}]"#,
            serde_json::to_string(REC).unwrap()
        );
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        let key = api_key_label_of("sk-client-key-1");
        let base = [
            "codex",
            "gpt-5.4",
            "gpt-5.4-high",
            "3f9c2a7d1b4e8c60",
            &key,
            "POST /v1/responses",
        ];
        assert_eq!(counter(&batch, Family::Requests, &base), 3);
        let mut failed_labels = base.to_vec();
        failed_labels.push("429");
        assert_eq!(counter(&batch, Family::Failures, &failed_labels), 1);
        let tok = |ty| {
            counter(
                &batch,
                Family::Tokens,
                &["codex", "gpt-5.4", "3f9c2a7d1b4e8c60", &key, ty],
            )
        };
        assert_eq!(tok("input"), 3 * 1026);
        assert_eq!(tok("cache_read"), 3 * 11008);
        assert_eq!(tok("reasoning"), 3 * 512);
        assert_eq!(counter(&batch, Family::Records, &["ingested"]), 3);
        assert_eq!(counter(&batch, Family::Records, &["control"]), 1);
        assert_eq!(counter(&batch, Family::Records, &["invalid"]), 2);
        assert_eq!(counter(&batch, Family::InvalidRecords, &["not_json"]), 1);
        assert_eq!(counter(&batch, Family::InvalidRecords, &["not_object"]), 1);
        assert_eq!(batch.elements, 6);
        assert_eq!(batch.last_record_timestamp, Some(1_787_409_543.512_874_1));
    }

    fn api_key_label_of(k: &str) -> String {
        labels::api_key_label(k)
    }

    #[test]
    fn exemplars_name_the_latest_record_per_bucket_with_its_end_time() {
        let slow = REC.replace(r#""latency_ms":8421"#, r#""latency_ms":95000"#);
        let failed = REC
            .replace(r#""failed":false"#, r#""failed":true"#)
            .replace(r#""status_code":200"#, r#""status_code":429"#)
            .replace("a1b2c3d4", "DEADBEEF");
        let unusable = REC.replace("a1b2c3d4", "not-hex!");
        let body = format!("[{REC},{slow},{failed},{unusable}]");
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        let route = ["codex", "gpt-5.4", "3f9c2a7d1b4e8c60"];
        let latency = batch
            .exemplars
            .get(Family::Duration, &to_labels(&route))
            .unwrap();
        // 8.421 s is in the 10 s bucket (index 7), 95 s in the 120 s one (index 14); the
        // failed record ends later than the first in the same bucket and wins it.
        let b7 = latency.get(7).unwrap();
        assert_eq!(b7.request_id.as_str(), "deadbeef");
        assert_eq!(b7.value, 8.421);
        assert!((b7.time - (1_787_409_543.512_874_1 + 8.421)).abs() < 1e-6);
        assert_eq!(latency.get(14).unwrap().request_id.as_str(), "a1b2c3d4");
        assert!(batch
            .exemplars
            .get(Family::Ttft, &to_labels(&route))
            .is_some());
        let key = api_key_label_of("sk-client-key-1");
        let failure = to_labels(&[
            "codex",
            "gpt-5.4",
            "gpt-5.4-high",
            "3f9c2a7d1b4e8c60",
            &key,
            "POST /v1/responses",
            "429",
        ]);
        let e = batch.exemplars.get(Family::Failures, &failure).unwrap();
        assert_eq!(e.get(0).unwrap().request_id.as_str(), "deadbeef");
        assert_eq!(e.get(0).unwrap().value, 1.0);
        // The ids are nowhere but in exemplars.
        assert!(!format!("{batch:?}").contains("a1b2c3d4"));
    }

    #[test]
    fn event_ids_deduplicate_within_and_across_batches() {
        let with_id = REC.replace(r#""request_id""#, r#""event_id":"e1","request_id""#);
        let body = format!("[{with_id},{with_id}]");
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        assert_eq!(counter(&batch, Family::Records, &["ingested"]), 1);
        assert_eq!(counter(&batch, Family::Records, &["duplicate"]), 1);
        assert_eq!(batch.event_ids.len(), 1);
        let again = from_body(body.as_bytes(), &Pricing::embedded(), |h| {
            h == batch.event_ids[0]
        })
        .unwrap();
        assert_eq!(counter(&again, Family::Records, &["duplicate"]), 2);
    }

    #[test]
    fn secrets_never_reach_labels() {
        let body = format!("[{REC}]");
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        for (_, labels, _) in batch.delta.iter() {
            for v in labels.iter() {
                for secret in ["sk-client-key-1", "alice", "203.0.113.7", "a1b2c3d4"] {
                    assert!(!v.contains(secret), "{v} leaks {secret}");
                }
            }
        }
    }

    #[test]
    fn empty_fields_get_documented_defaults() {
        let body = r#"[{"timestamp":"x","failed":true}]"#;
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        let base = ["unknown", "unknown", "unknown", "none", "none", "unknown"];
        assert_eq!(counter(&batch, Family::Requests, &base), 1);
        let mut f = base.to_vec();
        f.push("500");
        assert_eq!(counter(&batch, Family::Failures, &f), 1);
        assert!(batch.delta.families[Family::Duration as usize].is_empty());
    }

    #[test]
    fn raw_resp_payloads_are_classified_like_http_elements() {
        let elements: Vec<Vec<u8>> = vec![
            REC.as_bytes().to_vec(),
            b"not json".to_vec(),
            b"{\"timestamp\": broken".to_vec(),
            vec![0xff, 0xfe],
            b"[1]".to_vec(),
            br#"{"support_refresh":true}"#.to_vec(),
        ];
        let batch = ingest_elements(&elements, &Pricing::embedded(), |_| false);
        assert_eq!(counter(&batch, Family::Records, &["ingested"]), 1);
        assert_eq!(counter(&batch, Family::Records, &["control"]), 1);
        assert_eq!(counter(&batch, Family::InvalidRecords, &["not_json"]), 3);
        assert_eq!(counter(&batch, Family::InvalidRecords, &["not_object"]), 1);
    }

    #[test]
    fn quota_headers_are_kept_per_credential_latest_wins() {
        let rec = |ts: &str, pct: &str| {
            REC.replace("2026-08-22T14:39:03.512874113Z", ts).replace(
                r#""request_id""#,
                &format!(r#""response_headers":{{"X-Codex-Primary-Used-Percent":["{pct}"],"Cookie":["x"]}},"request_id""#),
            )
        };
        let body = format!(
            "[{},{}]",
            rec("2026-08-22T14:40:00Z", "50"),
            rec("2026-08-22T14:39:00Z", "40")
        );
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        let q = &batch.quota["3f9c2a7d1b4e8c60"];
        assert_eq!(
            q.fields[&quota::Field::UsedRatio(quota::Window::Primary)],
            0.5
        );
        assert_eq!(q.provider, "codex");
        // Observed at start + ttft (0.912 s).
        assert!((q.observed_at - (1_787_409_600.0 + 0.912)).abs() < 1e-6);
    }

    #[test]
    fn attempts_follow_the_queue_and_leave_out_duplicates_and_invalid_elements() {
        let with_id = REC.replace(r#""request_id""#, r#""event_id":"e1","request_id""#);
        let failed = REC
            .replace(r#""failed":false"#, r#""failed":true"#)
            .replace(r#""status_code":200"#, r#""status_code":429"#)
            .replace("a1b2c3d4", "ffff0000");
        let body = format!(r#"[{failed},{with_id},"garbage",{with_id},{REC}]"#);
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        let a = &batch.attempts;
        assert_eq!(a.len(), 3);
        assert_eq!(
            (
                a[0].failed,
                a[0].status_code,
                a[0].request_id.map(|r| r.as_str().to_owned())
            ),
            (true, 429, Some("ffff0000".to_owned()))
        );
        assert_eq!((a[1].failed, a[1].status_code), (false, 200));
        assert_eq!(a[1].request_key, a[2].request_key);
        assert_ne!(a[0].request_key, a[1].request_key);
        assert_eq!(
            a[1].request_key,
            Some(request_key("sk-client-key-1", "a1b2c3d4"))
        );
        let route = &a[1].route;
        assert_eq!(&*route.api_key, api_key_label_of("sk-client-key-1"));
        assert_eq!(
            (&*route.provider, &*route.model, &*route.requested_model),
            ("codex", "gpt-5.4", "gpt-5.4-high")
        );
        assert!(
            Arc::ptr_eq(&a[1].route, &a[2].route),
            "one route per label set"
        );
        assert_eq!(a[1].started, Some(1_787_409_543.512_874_1));
        assert_eq!(a[1].latency_seconds, Some(8.421));
        assert_eq!(a[1].ttft_seconds, Some(0.912));
        assert_eq!(a[1].tokens.0[Tokens::CACHE_READ], 11008);
        // The attempts' costs add up to the cost family's increment.
        let cost: u64 = a.iter().filter_map(|a| a.cost_nano_usd).sum();
        let key = api_key_label_of("sk-client-key-1");
        let family = counter(
            &batch,
            Family::Cost,
            &["codex", "gpt-5.4", "3f9c2a7d1b4e8c60", &key],
        );
        assert!(cost.abs_diff(family) <= 1, "{cost} vs {family}");
        assert!(cost > 0);
    }

    #[test]
    fn a_request_id_that_is_not_a_string_reads_as_absent() {
        let body = format!("[{}]", REC.replace(r#""a1b2c3d4""#, r#"{"x":[1]}"#));
        let batch = from_body(body.as_bytes(), &Pricing::embedded(), |_| false).unwrap();
        assert_eq!(batch.ingested, 1);
        assert_eq!(batch.attempts[0].request_key, None);
    }

    #[test]
    fn a_body_that_is_not_an_array_is_an_error() {
        assert!(from_body(br#"{"error":"x"}"#, &Pricing::embedded(), |_| false).is_err());
    }
}
