//! rtgate: a realtime WebSocket gateway.
//!
//! Ports and adapters: [`gateway`] owns WebSocket sessions, rooms and fan-out and talks to a
//! [`broker::Broker`]; [`broker`] holds one adapter per backend. Nothing outside `broker/` knows
//! which backend runs.

pub mod auth;
pub mod broker;
pub mod config;
pub mod gateway;
pub mod http;
pub mod protocol;
pub mod supervise;
pub mod telemetry;
pub mod webhooks;

/// The version reported in heartbeats, stats and telemetry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
