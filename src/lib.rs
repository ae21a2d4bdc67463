//! martd: the nginx module edge.
