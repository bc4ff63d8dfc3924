//! cpa-usage-exporter: drains CLIProxyAPI's usage queue into restart-proof Prometheus metrics.
#![forbid(unsafe_code)]

pub mod app;
pub mod budget;
pub mod check;
pub mod config;
pub mod cost;
pub mod cpa;
pub mod drain;
pub mod gap;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod poller;
pub mod schema;
pub mod series;
pub mod sim;
pub mod store;
