//! A rescan's use of BIP 158 block filters (`getblockfilter`, on a node started with
//! `-blockfilterindex`): blocks whose filters prove they neither pay nor spend any of the
//! watch's scripts are passed over, while no confirmation is owed. Every block that may
//! concern the watch, or has no usable filter, is read as before.

use std::collections::VecDeque;

use bitcoin::bip158::FilterHeader;
use bitcoin::{BlockHash, ScriptBuf};

use super::RescanJob;
use crate::blockfilter::CheckedFilter;
use crate::chain::ahead::resolve_hashes;
use crate::chain::{FollowError, Follower};
use crate::event::TipRef;
use crate::node::{ChainSource, NodeError, NodeResult};
use crate::store::ChainStore;
use crate::watch::{ListedScripts, WatchIndex};

/// Filters asked for at once: a mainnet block's is some 20 kB, twice that in hex.
const SPAN: u32 = 200;
/// Failed asks in a row after which the rescan stops asking and reads every block.
const MAX_FAILURES: u32 = 3;

pub(super) struct FilterState {
    /// False once the node shows it keeps no filters, or its answers failed too often.
    on: bool,
    /// Filters asked for and not used yet, for heights from the rescan's next one on, each
    /// with its block's hash; `None` where the node had no usable filter.
    ahead: VecDeque<(BlockHash, Option<CheckedFilter>)>,
    /// Filters asked for at once: halved when an answer is too large to read.
    span: u32,
    failures: u32,
    /// The watch's scripts, to ask the filters about: listed at `listed_at` scripts, and
    /// added to as the rescan derives more.
    scripts: Vec<ScriptBuf>,
    listed: ListedScripts,
    listed_at: usize,
    /// Whether a missing filter was already reported.
    told_missing: bool,
    /// The height and header of the last filter asked for: the next answer's first filter, if
    /// of the height after, must follow it.
    last_header: Option<(u32, FilterHeader)>,
}

impl FilterState {
    pub(super) fn new() -> FilterState {
        FilterState {
            on: true,
            ahead: VecDeque::new(),
            span: SPAN,
            failures: 0,
            scripts: Vec::new(),
            listed: ListedScripts::default(),
            listed_at: 0,
            told_missing: false,
            last_header: None,
        }
    }

    /// Whether filters are known for the heights ahead: then blocks are read only as needed.
    pub(super) fn guiding(&self) -> bool {
        self.on && !self.ahead.is_empty()
    }

    /// Whether the rescan has stopped asking for filters and reads every block.
    pub(super) fn off(&self) -> bool {
        !self.on
    }

    /// How many blocks from the rescan's next one must be read, as far as `max`: those whose
    /// filters may hold the watch's scripts, or that have none.
    pub(super) fn to_read(&self, max: u32) -> u32 {
        let must = |(hash, filter): &(BlockHash, Option<CheckedFilter>)| match filter {
            Some(f) => f.may_hold(hash, &self.scripts),
            None => true,
        };
        self.ahead
            .iter()
            .take(max as usize)
            .take_while(|a| must(a))
            .count() as u32
    }

    /// The hash the filters were asked for at `offset` heights past the rescan's next one.
    pub(super) fn hash_at(&self, offset: usize) -> Option<BlockHash> {
        self.ahead.get(offset).map(|a| a.0)
    }

    /// The rescan moved one block on.
    pub(super) fn passed(&mut self) {
        self.ahead.pop_front();
    }

    /// A reorg: what was asked may be of blocks no longer in the chain.
    pub(super) fn forget(&mut self) {
        self.ahead.clear();
        self.last_header = None;
    }
}

/// Where a look at the filters left the rescan.
pub(super) enum Skipped {
    /// At a block with no usable filter, or filters are off: it is read.
    Unfiltered,
    /// At a block its filter may hold: it is read.
    AtMatch,
    /// At the tip, or out of filters for this batch: the batch ends.
    Stop,
}

impl FilterState {
    /// Lists the scripts the watch gained since last time; false (and filters off) when they
    /// cannot be listed.
    fn list_scripts(&mut self, index: &WatchIndex, watch_id: &str) -> bool {
        let count = index.script_count();
        if count == self.listed_at && !self.scripts.is_empty() {
            return true;
        }
        match index.scripts_not_listed(&mut self.listed) {
            Some(more) => {
                self.scripts.extend(more);
                self.listed_at = count;
                true
            }
            None => {
                tracing::warn!(watch = %watch_id, "the watch's scripts cannot be listed; the rescan reads every block");
                self.on = false;
                false
            }
        }
    }
}

impl<S: ChainSource, St: ChainStore> Follower<S, St> {
    /// Moves the rescan past the blocks whose filters prove they hold nothing for the watch.
    /// Only while no confirmation is owed: a transaction owed one needs every block. Asks the
    /// node for filters at most once (`may_ask`), then stops.
    pub(super) async fn skip_by_filters(
        &mut self,
        job: &mut RescanJob,
        tip: u32,
        may_ask: &mut bool,
    ) -> Result<Skipped, FollowError> {
        if !job.filters.on || job.tracker.confirmations_owed(&job.index) > 0 {
            return Ok(Skipped::Unfiltered);
        }
        if !job.filters.list_scripts(&job.index, &job.watch_id) {
            return Ok(Skipped::Unfiltered);
        }
        // Out of the state while it is matched against, and back before any return.
        let scripts = std::mem::take(&mut job.filters.scripts);
        let skipped = self.skip_listed(job, tip, may_ask, &scripts).await;
        job.filters.scripts = scripts;
        skipped
    }

    async fn skip_listed(
        &mut self,
        job: &mut RescanJob,
        tip: u32,
        may_ask: &mut bool,
        scripts: &[ScriptBuf],
    ) -> Result<Skipped, FollowError> {
        let mut passed: Option<TipRef> = None;
        let skipped = loop {
            if job.next > tip {
                break Skipped::Stop;
            }
            let Some((hash, filter)) = job.filters.ahead.front() else {
                if !std::mem::take(may_ask) {
                    break Skipped::Stop;
                }
                // Done before asking, which may fail: what was passed over stays consistent.
                if let Some(tip) = passed.take() {
                    self.pass_over(job, tip)?;
                }
                self.ask_filters(job, tip).await?;
                if job.filters.ahead.is_empty() {
                    break Skipped::Unfiltered;
                }
                continue;
            };
            match filter {
                None => break Skipped::Unfiltered,
                Some(f) if f.may_hold(hash, scripts) => break Skipped::AtMatch,
                Some(_) => {}
            }
            passed = Some(TipRef {
                hash: *hash,
                height: job.next,
            });
            job.filters.passed();
            job.next += 1;
        };
        if let Some(tip) = passed {
            self.pass_over(job, tip)?;
        }
        Ok(skipped)
    }

    /// The rescan passed over blocks up to `tip`: what they made final is retired, as reading
    /// them would have.
    fn pass_over(&mut self, job: &mut RescanJob, tip: TipRef) -> Result<(), FollowError> {
        if let Some(p) = job.progress.as_mut() {
            p.tick(tip.height);
        }
        let step = job.tracker.passed_over(&job.index, tip);
        if !step.is_empty() {
            self.stage_rescan(job, step)?;
        }
        Ok(())
    }

    /// Asks for the filters of the next span of heights. A node without filters turns them
    /// off; an answer that cannot be used is reported, and after a few in a row turns them off
    /// too. Only an unreachable node is an error: reading blocks would fail the same way.
    async fn ask_filters(&mut self, job: &mut RescanJob, tip: u32) -> Result<(), FollowError> {
        let from = job.next;
        let to = tip.min(from.saturating_add(job.filters.span - 1));
        let lowest = self.lowest_kept()?.unwrap_or(u32::MAX);
        let kept = self.hashes_held(job, lowest, from, to)?;
        let node = self.source.node();
        let answer = async {
            let hashes = resolve_hashes(node, from, kept).await?;
            let filters = node.block_filters(&hashes).await?;
            Ok::<_, NodeError>((hashes, filters))
        };
        let f = &mut job.filters;
        match answer.await {
            Ok((hashes, filters)) => {
                f.failures = 0;
                take_filters(f, &job.watch_id, from, hashes, filters);
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e @ NodeError::TooLarge { .. }) if f.span > 1 => {
                f.span /= 2;
                tracing::warn!(error = %e, span = f.span, "block filters asked for in smaller spans");
            }
            Err(e) => {
                f.failures += 1;
                f.on = f.failures < MAX_FAILURES;
                tracing::warn!(watch = %job.watch_id, error = %e, reading_every_block = !f.on, "block filters failed; their blocks are read");
            }
        }
        Ok(())
    }
}

/// Keeps the filters of an answer, in height order from `from`, up to where they stop
/// chaining. Filters the node lacks are kept as `None`, so their blocks are read.
fn take_filters(
    f: &mut FilterState,
    watch_id: &str,
    from: u32,
    hashes: Vec<BlockHash>,
    filters: Vec<NodeResult<CheckedFilter>>,
) {
    // The last answer's last filter, if it is of the height just before this answer's first.
    let mut last = f
        .last_header
        .take()
        .filter(|(h, _)| h.checked_add(1) == Some(from));
    for (height, (hash, filter)) in (from..).zip(hashes.into_iter().zip(filters)) {
        let filter = match filter {
            Ok(filter) => filter,
            Err(e) if e.is_no_filter_index() => {
                tracing::info!(watch = %watch_id, "the node keeps no block filters (-blockfilterindex): the rescan reads every block");
                f.on = false;
                f.ahead.clear();
                return;
            }
            Err(e) => {
                if !std::mem::replace(&mut f.told_missing, true) {
                    tracing::warn!(height, error = %e, "the node has no usable filter for a block; such blocks are read");
                }
                f.ahead.push_back((hash, None));
                last = None;
                continue;
            }
        };
        if last.is_some_and(|(_, header)| !filter.follows(&header)) {
            tracing::warn!(
                height,
                "the node's block filters do not chain to each other; the blocks on both sides are read"
            );
            // Either side may be the forged one: a filter forged with its header breaks the
            // chain only at the next.
            if let Some(before) = f.ahead.back_mut() {
                before.1 = None;
            }
            f.ahead.push_back((hash, None));
            return;
        }
        last = Some((height, filter.header));
        f.ahead.push_back((hash, Some(filter)));
    }
    f.last_header = last;
}
