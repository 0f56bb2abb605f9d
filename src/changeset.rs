//! What one step changes, component by component. Each stage owns its change type (the followed
//! chain's tip, tracked transactions, coins and derivations, rescan progress, endpoint state);
//! a step's commit is their merge plus its events, and the store writes it in one transaction.
//! Memory is changed only after that commit succeeded, from the same change set.

use crate::delivery::EndpointChanges;
use crate::event::{self, NewEvent};
pub use crate::merge::Merge;
use crate::tip::TipChanges;
use crate::tracker::{TrackedChanges, TrackerStep, WatchEvent};
use crate::watch::{IndexChanges, RescanChanges, WatchIndex};

/// Everything one step commits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    pub tip: TipChanges,
    pub tracked: TrackedChanges,
    pub index: IndexChanges,
    pub rescan: RescanChanges,
    pub endpoints: EndpointChanges,
    /// Recorded in this order, each with its deliveries.
    pub events: Vec<NewEvent>,
}

impl ChangeSet {
    /// A change set of events alone.
    pub fn events(events: Vec<NewEvent>) -> ChangeSet {
        ChangeSet {
            events,
            ..ChangeSet::default()
        }
    }
}

impl ChangeSet {
    /// The tracker's step as a change set, its events labelled with their watch's record from
    /// `index`. A watch the store no longer has loses its events; a lookup that fails (`Err`)
    /// fails the step, before anything is committed.
    pub fn labelled(step: TrackerStep, index: &WatchIndex) -> Result<ChangeSet, String> {
        let mut events = Vec::with_capacity(step.events.len());
        for WatchEvent {
            watch_id,
            mut event,
        } in step.events
        {
            if let Some(watch) = index.record(&watch_id)? {
                event::label(&mut event, &watch);
                events.push(event);
            }
        }
        Ok(ChangeSet {
            tracked: step.tracked,
            index: step.index,
            ..ChangeSet::events(events)
        })
    }
}

impl Merge for ChangeSet {
    fn merge(&mut self, later: ChangeSet) {
        self.tip.merge(later.tip);
        self.tracked.merge(later.tracked);
        self.index.merge(later.index);
        self.rescan.merge(later.rescan);
        self.endpoints.merge(later.endpoints);
        self.events.extend(later.events);
    }

    fn is_empty(&self) -> bool {
        self.tip.is_empty()
            && self.tracked.is_empty()
            && self.index.is_empty()
            && self.rescan.is_empty()
            && self.endpoints.is_empty()
            && self.events.is_empty()
    }
}
