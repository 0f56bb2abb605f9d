//! The JSON Schema (draft 2020-12) of every event type's webhook body, as in the repository's
//! `schemas/` folder, built into the binary for `GET /v1/schemas/{type}`. A leaf: it imports
//! nothing of the crate.

const SCHEMAS: &[(&str, &str)] = &[
    (
        "alert.delivery_exhausted",
        include_str!("../schemas/alert.delivery_exhausted.json"),
    ),
    (
        "alert.endpoint_disabled",
        include_str!("../schemas/alert.endpoint_disabled.json"),
    ),
    (
        "alert.endpoint_failing",
        include_str!("../schemas/alert.endpoint_failing.json"),
    ),
    (
        "alert.leader_changed",
        include_str!("../schemas/alert.leader_changed.json"),
    ),
    (
        "alert.node_recovered",
        include_str!("../schemas/alert.node_recovered.json"),
    ),
    (
        "alert.node_unreachable",
        include_str!("../schemas/alert.node_unreachable.json"),
    ),
    ("alert.reorg", include_str!("../schemas/alert.reorg.json")),
    (
        "alert.store_error",
        include_str!("../schemas/alert.store_error.json"),
    ),
    (
        "block.connected",
        include_str!("../schemas/block.connected.json"),
    ),
    (
        "block.disconnected",
        include_str!("../schemas/block.disconnected.json"),
    ),
    (
        "tx.confirmation",
        include_str!("../schemas/tx.confirmation.json"),
    ),
    ("tx.confirmed", include_str!("../schemas/tx.confirmed.json")),
    ("tx.dropped", include_str!("../schemas/tx.dropped.json")),
    ("tx.pending", include_str!("../schemas/tx.pending.json")),
    ("tx.reorged", include_str!("../schemas/tx.reorged.json")),
    ("tx.replaced", include_str!("../schemas/tx.replaced.json")),
    ("webhook.test", include_str!("../schemas/webhook.test.json")),
];

/// The schema of event type `kind`, if it is one.
pub fn schema(kind: &str) -> Option<&'static str> {
    SCHEMAS.iter().find(|(k, _)| *k == kind).map(|(_, s)| *s)
}

/// Every event type with a schema.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    SCHEMAS.iter().map(|(k, _)| *k)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_event_type_has_a_schema_naming_it() {
        for kind in crate::event::all_kinds() {
            let text = super::schema(kind).unwrap_or_else(|| panic!("no schema for {kind}"));
            let schema: serde_json::Value = serde_json::from_str(text).expect("schemas are JSON");
            assert_eq!(
                schema["properties"]["type"]["const"], *kind,
                "{kind}'s schema is its own"
            );
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{kind}: draft 2020-12"
            );
        }
        assert_eq!(super::kinds().count(), crate::event::all_kinds().len());
    }
}
