//! chainwatch: follows a Bitcoin Core node and turns chain activity into signed webhooks.

pub mod api;
pub mod blockfilter;
pub mod chain;
pub mod changeset;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod demo;
pub mod dispatch;
pub mod event;
pub mod health;
pub mod merge;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pg;
pub mod proof;
pub mod schemas;
pub mod senders;
pub mod sha256d;
pub mod sign;
pub mod simnode;
pub mod store;
/// Support for tests, benches and the demo (config builder, capturing receiver, waits).
pub mod testkit;
pub mod tip;
pub mod tracker;
#[cfg(test)]
mod unit_kit;
pub mod watch;
