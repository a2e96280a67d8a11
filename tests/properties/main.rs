//! Property tests of every parser and state machine that takes network input: Twilio's
//! Media Streams messages and the stream machine, the call engine fed both peers at once, the
//! model's server events, Twilio's request signatures and form bodies, and the control-plane
//! API (request signing and the `/v1` documents).
//!
//! Each property states what holds for any input: nothing panics, every input is counted,
//! work and memory stay within the stated caps, and what is written back out is well formed.
//! Inputs come from generators seeded with the recorded fixtures (`fixtures/`) and from a
//! grammar of real messages whose fields are then mutated (`grammar`). Case counts are
//! modest so the whole file runs in seconds in a debug build; a failing case is shrunk and
//! saved under `proptest-regressions/`.

mod control;
mod engine;
mod grammar;
mod signature;
mod twilio;
mod upstream;

use proptest::test_runner::{Config, RngAlgorithm};

/// `cases` cases per property, or `PROPTEST_CASES` when set (for a longer search by hand).
/// XorShift rather than the default ChaCha: unoptimised ChaCha costs most of a debug run's
/// time, and these inputs need no cryptographic randomness.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    }
}
