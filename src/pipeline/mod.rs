//! The loops that drive the layers below: the drain loop (pop, ingest, commit), the management
//! poller, their shared backoff, the detection of drain gaps, and the reconciliation with CPA's
//! own counts.

pub mod backoff;
pub mod drain;
pub mod events;
pub mod gap;
pub mod poller;
pub mod reconcile;
