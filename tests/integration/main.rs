//! One integration-test binary: the simulated node against the real captures, and the whole
//! pipeline (simulated node → chainwatch → capturing receiver).

mod api;
mod captures;
mod chain_events;
mod cli;
mod crash;
mod delivery;
mod delivery_faults;
mod descriptors;
mod dispatch_steps;
mod faults;
mod fidelity;
mod ha;
mod harness;
mod mempool;
mod outbox;
mod pipeline;
mod real_node;
mod receivers;
mod rescan;
mod secrets;
mod senders;
mod shops;
mod store_faults;
mod tls_kit;
mod trust;
