//! Helpers shared by the unit tests of every crate in the workspace (public so the bridge's
//! tests use the same generator; nothing outside tests calls it).

/// A deterministic pseudo-random generator (Knuth's MMIX LCG), so randomised tests replay
/// exactly from their seed without a crate.
pub struct Lcg(pub u64);

impl Lcg {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
