//! What feeds the zone from outside it or keeps it beyond it, never blocking a worker's event
//! loop: `martd_persist` ([`persist`]).

pub mod persist;
