//! Watches (an address, or a descriptor with a gap limit) and the index that matches
//! transactions against them.

mod changes;
mod descriptor;
mod index;
mod scripts;
mod slots;

use bitcoin::hashes::{sha256, Hash};
use bitcoin::{Address, Network};
use serde::{Deserialize, Serialize};

pub use changes::{IndexChanges, RescanChanges};
pub use descriptor::{DescriptorError, WatchedDescriptor};
pub use index::{Derivation, ListedScripts, Overlay, Probe, WatchIndex, WatchLoader, WatchedCoin};

pub const MAX_METADATA_BYTES: usize = 4096;
pub const DEFAULT_GAP_LIMIT: u32 = 20;
pub const MAX_GAP_LIMIT: u32 = 10_000;

/// What a watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    Address { address: String },
    Descriptor { descriptor: String, gap_limit: u32 },
}

/// A watch with its confirmation target and the labels copied into its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watch {
    pub id: String,
    #[serde(flatten)]
    pub target: Target,
    pub confirmations: u32,
    pub label: Option<String>,
    pub metadata: serde_json::Value,
    /// Only these endpoints get this watch's events (`None`: every endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    /// Outputs below this pay nothing to the watch (a dust floor).
    #[serde(default)]
    pub min_amount_sat: u64,
}

impl Watch {
    pub fn new(
        address: &Address,
        confirmations: u32,
        label: Option<String>,
        metadata: serde_json::Value,
    ) -> Watch {
        Watch {
            id: watch_id(&format!("address:{address}")),
            target: Target::Address {
                address: address.to_string(),
            },
            confirmations,
            label,
            metadata,
            endpoints: None,
            min_amount_sat: 0,
        }
    }

    /// A descriptor watch; `descriptor` should be the canonical form (`WatchedDescriptor::canonical`).
    pub fn new_descriptor(
        descriptor: &str,
        gap_limit: u32,
        confirmations: u32,
        label: Option<String>,
        metadata: serde_json::Value,
    ) -> Watch {
        Watch {
            id: watch_id(&format!("descriptor:{descriptor}")),
            target: Target::Descriptor {
                descriptor: descriptor.to_string(),
                gap_limit,
            },
            confirmations,
            label,
            metadata,
            endpoints: None,
            min_amount_sat: 0,
        }
    }

    /// Routes its events to `endpoints` only, and ignores outputs below `min_amount_sat`.
    pub fn routed(mut self, endpoints: Option<Vec<String>>, min_amount_sat: u64) -> Watch {
        self.endpoints = endpoints;
        self.min_amount_sat = min_amount_sat;
        self
    }

    /// The address or descriptor: what makes a watch unique.
    pub fn target_text(&self) -> &str {
        match &self.target {
            Target::Address { address } => address,
            Target::Descriptor { descriptor, .. } => descriptor,
        }
    }
}

/// Watch ids derive from what is watched, so the same config yields the same ids (and event
/// ids) even on a fresh data directory.
pub fn watch_id(key: &str) -> String {
    let h = sha256::Hash::hash(key.as_bytes());
    format!("wch_{}", hex::encode(&h.as_byte_array()[..12]))
}

/// A watch's endpoint list must name configured endpoints, and at least one.
pub fn check_routes(routes: &[String], configured: &[&str]) -> Result<(), String> {
    if routes.is_empty() {
        return Err("an empty endpoint list would send this watch's events nowhere; leave it out to send them to every endpoint".into());
    }
    match routes.iter().find(|r| !configured.contains(&r.as_str())) {
        Some(unknown) => Err(format!(
            "no endpoint named {unknown:?} is configured (configured: {})",
            configured.join(", ")
        )),
        None => Ok(()),
    }
}

/// Metadata must be a JSON object of at most 4 KiB.
pub fn check_metadata(v: &serde_json::Value) -> Result<(), String> {
    if !v.is_object() {
        return Err("metadata must be a JSON object".into());
    }
    let len = v.to_string().len();
    if len > MAX_METADATA_BYTES {
        return Err(format!(
            "metadata is {len} bytes; at most {MAX_METADATA_BYTES} are allowed"
        ));
    }
    Ok(())
}

/// A watch target as a message may show it: an address whole; a descriptor only by its
/// outer function, since a refused one may hold private keys (xprv, WIF).
pub fn shown_target(text: &str) -> String {
    match text.split_once('(') {
        Some((func, _)) => format!("{}(… {} characters, not shown)", func.trim(), text.len()),
        None => text.to_string(),
    }
}

/// The longest label a watch may carry (it is copied into every event of the watch).
pub const MAX_LABEL_CHARS: usize = 256;

pub fn check_label(label: &str) -> Result<(), String> {
    let n = label.chars().count();
    if n > MAX_LABEL_CHARS {
        return Err(format!(
            "label has {n} characters; at most {MAX_LABEL_CHARS} are allowed"
        ));
    }
    Ok(())
}

/// Parses and checks a watch target given by a person: an address of `network`, or a descriptor
/// whose keys belong to `network`. Returns the watch ready to store.
pub fn parse_target(
    text: &str,
    network: Network,
    gap_limit: Option<u32>,
    confirmations: u32,
    label: Option<String>,
    metadata: serde_json::Value,
) -> Result<Watch, String> {
    if let Some(l) = &label {
        check_label(l)?;
    }
    let looks_like_descriptor = text.contains('(');
    if !looks_like_descriptor {
        if gap_limit.is_some() {
            return Err("gap_limit applies to descriptor watches only".into());
        }
        let unchecked: Address<bitcoin::address::NetworkUnchecked> = text
            .parse()
            .map_err(|e| format!("not a Bitcoin address or descriptor: {e}"))?;
        let addr = unchecked
            .require_network(network)
            .map_err(|_| format!("address is not for network {}", network_name(network)))?;
        return Ok(Watch::new(&addr, confirmations, label, metadata));
    }
    let gap = gap_limit.unwrap_or(DEFAULT_GAP_LIMIT);
    if gap == 0 || gap > MAX_GAP_LIMIT {
        return Err(format!(
            "gap_limit {gap}: must be between 1 and {MAX_GAP_LIMIT}"
        ));
    }
    let d = WatchedDescriptor::parse(text, network).map_err(|e| e.to_string())?;
    Ok(Watch::new_descriptor(
        &d.canonical(),
        gap,
        confirmations,
        label,
        metadata,
    ))
}

/// An output that pays a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedOutput {
    pub vout: u32,
    pub address: String,
    pub amount_sat: u64,
    /// For descriptor watches: the index the address was derived at.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub derivation_index: Option<u32>,
    /// For multipath descriptors (`<0;1>`): which of the paths (0 receive, 1 change).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub derivation_path: Option<u32>,
}

/// An input that spends an output a watch had received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedInput {
    pub prevout: String,
    pub address: String,
    pub amount_sat: u64,
}

/// What one transaction does to one watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxMatch {
    pub watch_id: String,
    pub outputs: Vec<MatchedOutput>,
    pub inputs: Vec<MatchedInput>,
}

impl TxMatch {
    pub fn amount_sat(&self) -> i64 {
        net_amount(&self.outputs, &self.inputs)
    }
}

/// Received minus spent: the watch's net change.
pub fn net_amount(outputs: &[MatchedOutput], inputs: &[MatchedInput]) -> i64 {
    let received: u64 = outputs.iter().map(|o| o.amount_sat).sum();
    let spent: u64 = inputs.iter().map(|i| i.amount_sat).sum();
    received as i64 - spent as i64
}

/// The network's name as the config and events spell it.
pub fn network_name(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "mainnet",
        Network::Testnet => "testnet",
        Network::Testnet4 => "testnet4",
        Network::Signet => "signet",
        _ => "regtest",
    }
}
