//! First replies this replica knows are in the delivery log, so the first-response watchdog
//! can let a complaint go without rendering a message and asking the database. A miss
//! (another replica sent it, or it was forgotten) costs only that database question: the
//! log stays the authority.

use std::collections::HashSet;
use std::sync::Mutex;

use uuid::Uuid;

/// The most recent ids, in two generations: when the newer one is full, the older one is
/// dropped. Holds at least `generation` and at most twice as many ids.
pub struct RecentIds {
    generation: usize,
    sets: Mutex<(HashSet<Uuid>, HashSet<Uuid>)>,
}

impl RecentIds {
    pub fn new(generation: usize) -> Self {
        Self {
            generation: generation.max(1),
            sets: Mutex::new((HashSet::new(), HashSet::new())),
        }
    }

    pub fn remember(&self, id: Uuid) {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let (newer, older) = &mut *sets;
        if newer.len() >= self.generation {
            *older = std::mem::take(newer);
        }
        newer.insert(id);
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.0.contains(id) || sets.1.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_ids_and_forgets_the_oldest_generation() {
        let recent = RecentIds::new(2);
        let ids: Vec<Uuid> = (0..5u128).map(Uuid::from_u128).collect();
        for id in &ids {
            recent.remember(*id);
        }
        // Generations of two: {4} is the newer, {2, 3} the older; {0, 1} were dropped.
        assert!(!recent.contains(&ids[0]) && !recent.contains(&ids[1]));
        assert!(ids[2..].iter().all(|id| recent.contains(id)));
        assert!(!recent.contains(&Uuid::from_u128(99)));
    }
}
