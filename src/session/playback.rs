//! Playback accounting, pacing and barge-in (see BARGE-IN.md).
