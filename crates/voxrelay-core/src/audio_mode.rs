//! The audio format spoken between the bridge and the model.

use std::fmt;
use std::str::FromStr;

/// How caller audio reaches the model and model audio reaches the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// G.711 μ-law 8 kHz end to end: Twilio's payload is passed to the model untouched.
    #[default]
    Pcmu,
    /// PCM16 24 kHz to the model: μ-law is decoded and resampled 8 ⇄ 24 kHz by the bridge.
    Pcm16,
}

impl AudioMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AudioMode::Pcmu => "pcmu",
            AudioMode::Pcm16 => "pcm16",
        }
    }
}

impl fmt::Display for AudioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown audio mode {0:?}: expected `pcmu` or `pcm16`")]
pub struct UnknownAudioMode(String);

impl FromStr for AudioMode {
    type Err = UnknownAudioMode;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "pcmu" => Ok(AudioMode::Pcmu),
            "pcm16" => Ok(AudioMode::Pcm16),
            _ => Err(UnknownAudioMode(value.to_owned())),
        }
    }
}
