//! Which realtime voice API answers a call: the one name the tenant context, the bridge's
//! environment, reports and metrics share.

use std::fmt;
use std::str::FromStr;

/// A realtime provider. Chosen per tenant (`provider` in the tenant context), else by the
/// bridge's `VOXRELAY_PROVIDER`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI Realtime (GA shape).
    #[default]
    OpenAi,
    /// Google Gemini Live (`BidiGenerateContent`).
    Gemini,
}

impl Provider {
    pub const ALL: [Provider; 2] = [Provider::OpenAi, Provider::Gemini];

    /// The name used in contexts, environment variables, reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Gemini => "gemini",
        }
    }

    /// The model a session gets when its tenant names none.
    pub fn default_model(self) -> &'static str {
        match self {
            Provider::OpenAi => "gpt-realtime",
            // The Gemini API's stable Live model as of late 2026 (docs: models/gemini-3.8-live).
            Provider::Gemini => "gemini-3.8-live",
        }
    }

    /// The voice a session gets when neither tenant nor environment names one: voice names
    /// are the provider's own.
    pub fn default_voice(self) -> &'static str {
        match self {
            Provider::OpenAi => "marin",
            Provider::Gemini => "Kore",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown provider {0:?}: expected `openai` or `gemini`")]
pub struct UnknownProvider(String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(Provider::OpenAi),
            "gemini" => Ok(Provider::Gemini),
            _ => Err(UnknownProvider(value.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for provider in Provider::ALL {
            assert_eq!(provider.as_str().parse::<Provider>().unwrap(), provider);
            let json = serde_json::to_string(&provider).unwrap();
            assert_eq!(json, format!("\"{provider}\""));
            assert_eq!(serde_json::from_str::<Provider>(&json).unwrap(), provider);
        }
        assert_eq!(" Gemini ".parse::<Provider>().unwrap(), Provider::Gemini);
        assert!("anthropic".parse::<Provider>().is_err());
        assert!(serde_json::from_str::<Provider>("\"OpenAI\"").is_err());
    }
}
