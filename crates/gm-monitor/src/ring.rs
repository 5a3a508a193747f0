//! [`Ring`]: a fixed-capacity ring buffer holding the newest `capacity`
//! items (the sample history). Pushing into a full ring overwrites the
//! oldest item; the ring never grows past the capacity it was built with.

/// A fixed-capacity ring of the newest `capacity` items, oldest first.
#[derive(Debug, Clone)]
pub struct Ring<T> {
    items: Vec<T>,
    /// Index of the oldest item once the ring is full (where the next push
    /// writes); `0` while filling.
    head: usize,
    capacity: usize,
}

impl<T> Ring<T> {
    /// An empty ring of `capacity` items (at least 1). Allocates the
    /// capacity up front.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            items: Vec::with_capacity(capacity),
            head: 0,
            capacity,
        }
    }

    /// The most items it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// `true` before the first push.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends `item`; when full, the oldest item is dropped and returned.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.items.len() < self.capacity {
            self.items.push(item);
            None
        } else {
            let old = std::mem::replace(&mut self.items[self.head], item);
            self.head = (self.head + 1) % self.capacity;
            Some(old)
        }
    }

    /// The newest item.
    pub fn last(&self) -> Option<&T> {
        if self.items.is_empty() {
            None
        } else {
            let i = (self.head + self.items.len() - 1) % self.items.len();
            self.items.get(i)
        }
    }

    /// Items oldest first (double-ended: `.rev()` walks newest first).
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + Clone {
        let (newer, older) = self.items.split_at(self.head);
        older.iter().chain(newer.iter())
    }

    /// Removes every item (keeps the allocation).
    pub fn clear(&mut self) {
        self.items.clear();
        self.head = 0;
    }
}

impl<T: Clone> Ring<T> {
    /// The items, oldest first, as a `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn keeps_the_newest_items_in_order() {
        let mut r = Ring::new(3);
        assert!(r.is_empty());
        assert_eq!(r.last(), None);
        for i in 0..3 {
            assert_eq!(r.push(i), None);
        }
        assert_eq!(r.push(3), Some(0));
        assert_eq!(r.to_vec(), vec![1, 2, 3]);
        assert_eq!(r.iter().rev().copied().collect::<Vec<_>>(), vec![3, 2, 1]);
        assert_eq!(r.last(), Some(&3));
        assert_eq!((r.len(), r.capacity()), (3, 3));
        r.clear();
        assert!(r.is_empty());
        r.push(9);
        assert_eq!(r.to_vec(), vec![9]);
    }

    #[test]
    fn zero_capacity_is_one() {
        let mut r = Ring::new(0);
        r.push(1);
        r.push(2);
        assert_eq!(r.to_vec(), vec![2]);
    }

    proptest! {
        /// The ring behaves like a VecDeque that drops its front when full.
        #[test]
        fn matches_a_bounded_deque(cap in 1usize..16, ops in proptest::collection::vec(any::<Option<u16>>(), 0..200)) {
            let mut ring = Ring::new(cap);
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Some(v) => {
                        let dropped = if model.len() == cap { model.pop_front() } else { None };
                        model.push_back(v);
                        prop_assert_eq!(ring.push(v), dropped);
                    }
                    None => {
                        prop_assert_eq!(ring.iter().count(), model.len());
                        prop_assert_eq!(ring.iter().rev().copied().collect::<Vec<_>>(),
                            model.iter().rev().copied().collect::<Vec<_>>());
                    }
                }
                prop_assert_eq!(ring.len(), model.len());
                prop_assert!(ring.len() <= cap);
                prop_assert_eq!(ring.last(), model.back());
                prop_assert_eq!(ring.to_vec(), model.iter().copied().collect::<Vec<_>>());
            }
        }
    }
}
