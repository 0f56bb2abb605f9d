//! The delivery stage's vocabulary: the status a delivery is in, and the change set of endpoint
//! state a step commits with its events.

use crate::merge::Merge;

/// Where one delivery of one event to one endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not tried yet, or waiting for its first attempt after a redelivery.
    Pending,
    /// Tried and failed; retried at its next attempt time.
    Failed,
    /// Accepted by the endpoint (2xx).
    Delivered,
    /// Every attempt failed; only a redelivery sends it again.
    Dead,
    /// Its stored row failed the audit check: not sent until an operator looks.
    Held,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Failed,
        DeliveryStatus::Delivered,
        DeliveryStatus::Dead,
        DeliveryStatus::Held,
    ];

    /// The name stored and shown (`deliveries list`, the API).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Held => "held",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        DeliveryStatus::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

impl std::fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Endpoint state a step changes with its events (an endpoint disabled with its alert).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointChanges {
    /// Endpoint name → why it was disabled.
    pub disabled: Vec<(String, String)>,
}

impl EndpointChanges {
    pub fn disable(name: &str, reason: &str) -> EndpointChanges {
        EndpointChanges {
            disabled: vec![(name.to_string(), reason.to_string())],
        }
    }
}

impl Merge for EndpointChanges {
    fn merge(&mut self, later: EndpointChanges) {
        for (name, reason) in later.disabled {
            self.disabled.retain(|(n, _)| *n != name);
            self.disabled.push((name, reason));
        }
    }

    fn is_empty(&self) -> bool {
        self.disabled.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_from_its_name() {
        for s in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(s.as_str()), Some(s), "{s}");
        }
        assert_eq!(
            DeliveryStatus::parse("Pending"),
            None,
            "names are lowercase"
        );
    }

    #[test]
    fn a_later_disable_of_the_same_endpoint_replaces_the_reason() {
        let mut c = EndpointChanges::disable("shop", "410 Gone");
        c.merge(EndpointChanges::disable("erp", "410 Gone"));
        c.merge(EndpointChanges::disable("shop", "operator"));
        assert_eq!(
            c.disabled,
            [
                ("erp".to_string(), "410 Gone".to_string()),
                ("shop".to_string(), "operator".to_string())
            ]
        );
        assert!(EndpointChanges::default().is_empty());
    }
}
