//! The deliveries of one channel not settled yet, and which `multiple` ack may cover them.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// The delivery tags of one channel not settled yet. A `multiple` ack settles every unsettled
/// delivery up to its tag, so it may be sent only when all of those are the sender's to ack;
/// and settlements are written in the order they were decided (`order`), else an ack of tag
/// 7 could overtake the `multiple` ack of tag 9 that already settled it, and the broker
/// closes the channel for an unknown tag.
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    tags: Mutex<BTreeSet<u64>>,
    order: tokio::sync::Mutex<()>,
}

impl Unsettled {
    /// Tracks a delivery received.
    pub(super) fn received(&self, tag: u64) {
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag);
    }

    /// Forgets `ours`, and returns the highest of them that a `multiple` ack may cover: every
    /// unsettled tag up to it is one of `ours`. `None` when the lowest unsettled tag is not.
    pub(super) fn take(&self, ours: &BTreeSet<u64>) -> Option<u64> {
        let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        let upto = tags.iter().take_while(|t| ours.contains(t)).last().copied();
        tags.retain(|t| !ours.contains(t));
        upto
    }

    /// Holds the channel's turn to write a settlement, so that settlements go out in the
    /// order they were decided.
    pub(super) async fn in_order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.order.lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiple_ack_covers_only_the_lowest_unsettled_tags_when_all_are_ours() {
        let unsettled = Unsettled::default();
        for tag in 1..=6 {
            unsettled.received(tag);
        }
        // 1 and 2 are ours, 3 is not: a multiple ack up to 2; 5 goes on its own.
        assert_eq!(unsettled.take(&BTreeSet::from([1, 2, 5])), Some(2));
        // 3 is still unsettled and not ours: no multiple ack for 4.
        assert_eq!(unsettled.take(&BTreeSet::from([4])), None);
        // Now 3 and 6 are the only ones left.
        assert_eq!(unsettled.take(&BTreeSet::from([3, 6])), Some(6));
        assert_eq!(unsettled.take(&BTreeSet::from([7])), None);
    }
}
