//! Token buckets: the unit every later stage (pricing, ingest, the store) counts in.

/// Non-overlapping token buckets, in the order of [`crate::families::TOKEN_TYPES`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens(pub [u64; 6]);

impl Tokens {
    pub const INPUT: usize = 0;
    pub const CACHE_READ: usize = 1;
    pub const CACHE_WRITE: usize = 2;
    pub const OUTPUT: usize = 3;
    pub const REASONING: usize = 4;
    pub const UNCLASSIFIED: usize = 5;

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub(crate) fn unclassified(total: u64) -> Tokens {
        let mut t = Tokens::default();
        t.0[Self::UNCLASSIFIED] = total;
        t
    }
}
