//! The `Merge` trait every component's change set implements.

/// A component's change set: two of them merge into one that has the effect of both, in order.
pub trait Merge {
    /// Folds `later` into `self`, as if `later` were applied after `self`.
    fn merge(&mut self, later: Self);
    /// Whether applying it would change nothing.
    fn is_empty(&self) -> bool;
}
