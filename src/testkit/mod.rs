//! Support for tests, benches and the demo: a typed `watcher.toml` builder, the one capturing
//! webhook receiver (also behind `chainwatch receive`), deadline waits and a child-process
//! guard. Not used by the daemon itself.

pub mod config;
pub mod events;
pub mod postgres;
pub mod process;
pub mod receiver;
pub mod wait;

pub use config::{
    Api, Audit, Bitcoind, ConfigBuilder, Endpoint, Retention, StoreSection, WatchEntry,
};
pub use events::{sample_event, sample_events};
pub use process::{free_port, health_role, refusing_address, run_daemon, wait_role, KillOnDrop};
pub use receiver::{Captured, Receiver, ReceiverBuilder, Reply};
pub use wait::{poll, wait_for, wait_until};
