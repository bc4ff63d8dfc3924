//! cpa-usage-exporter: drains CLIProxyAPI's usage queue into restart-proof Prometheus metrics.
//!
//! Modules in the order a record meets them; each imports only modules listed above it
//! (tests/layout.rs checks that no two modules import each other, directly or around a cycle).
#![forbid(unsafe_code)]

// Leaf data and helpers: no imports from this crate beyond each other.
pub mod families;
pub mod labels;
pub mod secret;
pub mod series;
pub mod time;
pub mod tokens;

// The story of a record: popped from CPA, priced, aggregated, committed, rendered, served.
pub mod cpa;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pricing;
pub mod store;

// The loops that drive it: drain, management poller, backoff, gap detection.
pub mod pipeline;

// On top: configuration, wiring, the `check` command.
pub mod app;
pub mod check;
pub mod config;
