//! Wire formats of the streaming transports, without nginx: EventSource events and WebSocket
//! frames.

pub mod sse;
pub mod websocket;
