//! Audio codecs: G.711 μ-law/A-law (bit-exact with the ITU-T STL), 16-bit little-endian PCM
//! framing, and streaming sample-rate conversion between the telephone rate (8 kHz) and the
//! upstream rates (16 and 24 kHz), and from 16 to 24 kHz.
//!
//! Everything here is synchronous and allocation-free in steady state: callers pass reused
//! output buffers, and the resampler keeps its own scratch buffers and any input it could not
//! yet consume, so audio split at arbitrary points comes out exactly as if it had arrived in
//! whole frames.

pub mod chime;
pub mod g711;
pub mod pcm;
pub mod resample;

pub use resample::{ResampleError, StreamResampler};
