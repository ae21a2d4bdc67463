//! What feeds the zone from outside it or keeps it beyond it, never blocking a worker's event
//! loop: `martd_persist` ([`persist`]) and `martd_redis_url` ([`redis`]).

pub mod held;
pub mod persist;
pub mod redis;
pub mod side;
