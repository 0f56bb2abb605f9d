//! chainwatch: follows a Bitcoin Core node and turns chain activity into signed webhooks.

pub mod api;
pub mod chain;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod health;
pub mod metrics;
pub mod net;
pub mod node;
pub mod proof;
pub mod sign;
pub mod simnode;
pub mod store;
/// Support for tests, benches and the demo (config builder, capturing receiver, waits).
pub mod testkit;
pub mod tracker;
pub mod watch;
