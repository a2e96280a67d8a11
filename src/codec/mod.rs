//! Audio codecs: G.711 μ-law/A-law and streaming resampling.

pub mod g711;
