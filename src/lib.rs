//! chainwatch: follows a Bitcoin Core node and turns chain activity into signed webhooks.

pub mod config;
pub mod dispatch;
pub mod chain;
pub mod event;
pub mod sign;
pub mod simnode;
pub mod store;
pub mod tracker;
pub mod watch;
pub mod node;
