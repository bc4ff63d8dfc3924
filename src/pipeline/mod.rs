//! The loops that drive the layers below: the drain loop (pop, ingest, commit), the management
//! poller, their shared backoff, and the detection of drain gaps.

pub mod backoff;
pub mod drain;
pub mod events;
pub mod gap;
pub mod poller;
