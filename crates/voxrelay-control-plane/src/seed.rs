//! The reference control plane's seed file: tenants, their numbers, tools, business hours and
//! call-continuity settings, parsed from TOML and validated before anything touches the
//! database.
//!
//! Owns the seed format (see `fixtures/tenants.toml` and `docs/control-plane-api.md`, part 3),
//! its rules, and the reading of the files a seed names ([`SeedFiles`]: the seed file's
//! directory, or the shipped fixtures compiled in). Invariants of a [`Seed`] that parsed: tenant
//! ids are unique and safe as a memory-namespace prefix (`[A-Za-z0-9_-]`, so never a `/`); every
//! number is E.164 and belongs to exactly one tenant; every tool is one of
//! [`tools::TOOL_NAMES`](super::tools::TOOL_NAMES) and listed once; opening hours are
//! `HH:MM-HH:MM` with the opening before the closing; a fallback number passes the bridge's own
//! E.164 check ([`api::is_e164`]); a hold prompt is 1 to [`MAX_HOLD_PROMPT_BYTES`] bytes, read
//! whole at parse time (a file never costs more than that limit plus one byte to read); a
//! `provider` is one the bridge knows ([`Provider`]) and a `model` a plausible model id
//! ([`is_valid_model_id`]), both optional (absent: the bridge's defaults). Errors name the
//! tenant (by index and id) and the field, never a whole value.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use super::hours::{BusinessHours, OpenHours, WEEKDAYS};
use super::tools::Tool;
use voxrelay_core::control::api::{self, MAX_HOLD_PROMPT_BYTES};
use voxrelay_core::{AudioMode, Provider};

/// Longest tenant id accepted: it prefixes every memory namespace.
const MAX_TENANT_ID_LEN: usize = 64;

/// Longest model id accepted. Real ids are far shorter (`gemini-3.8-live`); the bound keeps a
/// typo'd paste from reaching the bridge and the provider's connect URL.
pub const MAX_MODEL_ID_LEN: usize = 128;

/// The seed the repository ships (`fixtures/tenants.toml`).
pub const SHIPPED_SEED: &str = include_str!("../../../fixtures/tenants.toml");

/// The files beside the shipped seed that it names, by the name it uses, compiled in with it.
const SHIPPED_FILES: [(&str, &[u8]); 1] = [(
    "hold-prompt-8k-mulaw.raw",
    include_bytes!("../../../fixtures/hold-prompt-8k-mulaw.raw"),
)];

/// A seed's text and where the files it names (`hold_prompt_file`) are read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSource {
    pub text: String,
    pub files: SeedFiles,
}

impl SeedSource {
    /// The shipped seed with its files, compiled in (the demo, the benchmark, tests).
    pub fn shipped() -> Self {
        Self::with_shipped_files(SHIPPED_SEED)
    }

    /// Seed text whose `hold_prompt_file`s are the shipped fixtures (the shipped seed, edited).
    pub fn with_shipped_files(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            files: SeedFiles::Shipped,
        }
    }

    /// Reads a seed file; the files it names are relative to its directory.
    pub fn read(path: &Path) -> io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Self {
            text,
            files: SeedFiles::Dir(dir),
        })
    }

    /// Parses and validates the seed, reading the files it names.
    pub fn parse(&self) -> Result<Seed, SeedError> {
        Seed::parse(&self.text, &self.files)
    }
}

/// Where the files a seed names come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeedFiles {
    /// Paths relative to this directory (the seed file's); an absolute path is refused, so a
    /// seed and its files move together.
    Dir(PathBuf),
    /// The fixtures the shipped seed names, compiled in: the shipped seed then works from any
    /// working directory and in a binary far from the checkout. Other names are not found.
    Shipped,
}

impl SeedFiles {
    /// The file's bytes, or the first `limit + 1` of them when it is longer (enough for the
    /// caller to tell it is too long without reading, or holding, the rest).
    fn read(&self, relative: &str, limit: usize) -> io::Result<Vec<u8>> {
        match self {
            SeedFiles::Dir(dir) => {
                let relative = Path::new(relative);
                if relative.is_absolute() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "the path must be relative to the seed file's directory",
                    ));
                }
                let mut bytes = Vec::new();
                std::fs::File::open(dir.join(relative))?
                    .take(limit as u64 + 1)
                    .read_to_end(&mut bytes)?;
                Ok(bytes)
            }
            SeedFiles::Shipped => SHIPPED_FILES
                .iter()
                .find(|(name, _)| *name == relative)
                .map(|(_, bytes)| bytes[..bytes.len().min(limit + 1)].to_vec())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "not one of the files shipped with the seed",
                    )
                }),
        }
    }
}

/// A validated seed file.
#[derive(Clone, Debug, PartialEq)]
pub struct Seed {
    pub tenants: Vec<SeedTenant>,
}

/// One tenant as the seed file describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedTenant {
    pub id: String,
    pub agent_name: String,
    pub voice: String,
    pub greeting: Option<String>,
    pub instructions: String,
    pub audio_mode: AudioMode,
    pub language: String,
    pub max_call_seconds: u32,
    /// Enabled tools, in the order the context lists them.
    pub tools: Vec<Tool>,
    pub business_hours: BusinessHours,
    /// E.164 numbers that reach this tenant.
    pub numbers: Vec<String>,
    /// Where callers go when no model session can be had (E.164, as the bridge checks it).
    pub fallback_number: Option<String>,
    /// What callers hear while a lost model session is replaced: 8 kHz μ-law, 1 to
    /// [`MAX_HOLD_PROMPT_BYTES`] bytes, read from the seed's `hold_prompt_file`.
    pub hold_prompt: Option<Vec<u8>>,
    /// The realtime provider for this tenant's calls; `None`: the bridge's `VOXRELAY_PROVIDER`.
    pub provider: Option<Provider>,
    /// The provider's model id; `None`: the bridge's default model for the provider.
    pub model: Option<String>,
    /// Whether the tenant's calls are recorded; `None`: the bridge's `VOXRELAY_RECORD`.
    pub record: Option<bool>,
}

/// Why a seed file was refused. Validation errors do not echo values (a seed may carry long or
/// private instructions): the tenant's position and id and the field are enough to find the
/// line. A TOML syntax error is shown as the `toml` crate reports it, with its line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    #[error("the seed is not valid TOML for the seed format: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("the seed has no tenants")]
    NoTenants,
    #[error(
        "tenant {index}: the id must be 1 to {MAX_TENANT_ID_LEN} characters of A-Z, a-z, 0-9, `_` or `-`"
    )]
    InvalidTenantId { index: usize },
    #[error("tenant {index} ({tenant}): the id is used by an earlier tenant")]
    DuplicateTenant { index: usize, tenant: String },
    #[error("tenant {index} ({tenant}): `{field}` must not be empty")]
    EmptyField {
        index: usize,
        tenant: String,
        field: &'static str,
    },
    #[error("tenant {index} ({tenant}): `audio_mode` must be `pcmu` or `pcm16`")]
    InvalidAudioMode { index: usize, tenant: String },
    #[error("tenant {index} ({tenant}): tool {position} is not a known tool")]
    UnknownTool {
        index: usize,
        tenant: String,
        position: usize,
    },
    #[error("tenant {index} ({tenant}): tool {position} is listed twice")]
    DuplicateTool {
        index: usize,
        tenant: String,
        position: usize,
    },
    #[error("tenant {index} ({tenant}): number {position} is not E.164 (`+` and 2 to 15 digits)")]
    InvalidNumber {
        index: usize,
        tenant: String,
        position: usize,
    },
    #[error(
        "tenant {index} ({tenant}): number {position} is already listed (here or by another tenant)"
    )]
    DuplicateNumber {
        index: usize,
        tenant: String,
        position: usize,
    },
    #[error(
        "tenant {index} ({tenant}): business hours for {day} must be `closed` or `HH:MM-HH:MM` with the opening first"
    )]
    InvalidHours {
        index: usize,
        tenant: String,
        day: &'static str,
    },
    #[error(
        "tenant {index} ({tenant}): `fallback_number` is not E.164 (`+` and 8 to 15 digits, the first not 0)"
    )]
    InvalidFallbackNumber { index: usize, tenant: String },
    #[error("tenant {index} ({tenant}): `hold_prompt_file` cannot be read: {source}")]
    HoldPromptUnreadable {
        index: usize,
        tenant: String,
        source: io::Error,
    },
    #[error(
        "tenant {index} ({tenant}): `hold_prompt_file` must hold 1 to {MAX_HOLD_PROMPT_BYTES} bytes of 8 kHz μ-law"
    )]
    HoldPromptSize { index: usize, tenant: String },
    #[error("tenant {index} ({tenant}): `provider` must be `openai` or `gemini`")]
    UnknownProvider { index: usize, tenant: String },
    #[error(
        "tenant {index} ({tenant}): `model` must be 1 to {MAX_MODEL_ID_LEN} characters of A-Z, a-z, 0-9, `.`, `_` or `-`"
    )]
    InvalidModel { index: usize, tenant: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeed {
    #[serde(default)]
    tenants: Vec<RawTenant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    agent_name: String,
    voice: String,
    #[serde(default)]
    greeting: Option<String>,
    instructions: String,
    audio_mode: String,
    language: String,
    #[serde(default)]
    max_call_seconds: u32,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    numbers: Vec<String>,
    #[serde(default)]
    business_hours: RawBusinessHours,
    #[serde(default)]
    fallback_number: Option<String>,
    /// Relative to the seed file's directory.
    #[serde(default)]
    hold_prompt_file: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    record: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBusinessHours {
    #[serde(default)]
    timezone: String,
    monday: Option<String>,
    tuesday: Option<String>,
    wednesday: Option<String>,
    thursday: Option<String>,
    friday: Option<String>,
    saturday: Option<String>,
    sunday: Option<String>,
}

impl Seed {
    /// Parses and validates a seed file's text, reading the files it names from `files`.
    pub fn parse(text: &str, files: &SeedFiles) -> Result<Self, SeedError> {
        let raw: RawSeed = toml::from_str(text)?;
        if raw.tenants.is_empty() {
            return Err(SeedError::NoTenants);
        }
        let mut tenant_ids = HashSet::new();
        let mut numbers = HashSet::new();
        let mut tenants = Vec::with_capacity(raw.tenants.len());
        for (position, raw_tenant) in raw.tenants.into_iter().enumerate() {
            let tenant = validate_tenant(position + 1, raw_tenant, &mut numbers, files)?;
            if !tenant_ids.insert(tenant.id.clone()) {
                return Err(SeedError::DuplicateTenant {
                    index: position + 1,
                    tenant: tenant.id,
                });
            }
            tenants.push(tenant);
        }
        Ok(Self { tenants })
    }
}

fn validate_tenant(
    index: usize,
    raw: RawTenant,
    numbers_seen: &mut HashSet<String>,
    files: &SeedFiles,
) -> Result<SeedTenant, SeedError> {
    let id = raw.id.trim().to_owned();
    if !is_valid_tenant_id(&id) {
        return Err(SeedError::InvalidTenantId { index });
    }
    let tenant = id.clone();
    let non_empty = |value: String, field: &'static str| {
        let value = value.trim().to_owned();
        if value.is_empty() {
            Err(SeedError::EmptyField {
                index,
                tenant: tenant.clone(),
                field,
            })
        } else {
            Ok(value)
        }
    };
    let agent_name = non_empty(raw.agent_name, "agent_name")?;
    let voice = non_empty(raw.voice, "voice")?;
    let instructions = non_empty(raw.instructions, "instructions")?;
    let language = non_empty(raw.language, "language")?;
    // An empty greeting means "say nothing first", the same as leaving it out.
    let greeting = raw
        .greeting
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty());
    let audio_mode = match raw.audio_mode.as_str() {
        "pcmu" => AudioMode::Pcmu,
        "pcm16" => AudioMode::Pcm16,
        _ => {
            return Err(SeedError::InvalidAudioMode {
                index,
                tenant: tenant.clone(),
            });
        }
    };

    let mut tools = Vec::with_capacity(raw.tools.len());
    for (position, name) in raw.tools.iter().enumerate() {
        let tool = Tool::from_name(name.trim()).ok_or_else(|| SeedError::UnknownTool {
            index,
            tenant: tenant.clone(),
            position: position + 1,
        })?;
        if tools.contains(&tool) {
            return Err(SeedError::DuplicateTool {
                index,
                tenant: tenant.clone(),
                position: position + 1,
            });
        }
        tools.push(tool);
    }

    let mut numbers = Vec::with_capacity(raw.numbers.len());
    for (position, number) in raw.numbers.iter().enumerate() {
        let number = number.trim();
        if !is_e164(number) {
            return Err(SeedError::InvalidNumber {
                index,
                tenant: tenant.clone(),
                position: position + 1,
            });
        }
        if !numbers_seen.insert(number.to_owned()) {
            return Err(SeedError::DuplicateNumber {
                index,
                tenant: tenant.clone(),
                position: position + 1,
            });
        }
        numbers.push(number.to_owned());
    }

    let hours = raw.business_hours;
    let raw_days = [
        hours.monday,
        hours.tuesday,
        hours.wednesday,
        hours.thursday,
        hours.friday,
        hours.saturday,
        hours.sunday,
    ];
    let mut days: [Option<OpenHours>; 7] = Default::default();
    for ((slot, raw_day), day) in days.iter_mut().zip(raw_days).zip(WEEKDAYS) {
        *slot = match raw_day.as_deref().map(str::trim) {
            None | Some("closed") => None,
            Some(text) => Some(
                parse_open_hours(text).ok_or_else(|| SeedError::InvalidHours {
                    index,
                    tenant: tenant.clone(),
                    day,
                })?,
            ),
        };
    }

    let fallback_number = match raw.fallback_number {
        None => None,
        Some(number) => {
            let number = number.trim();
            if !api::is_e164(number) {
                return Err(SeedError::InvalidFallbackNumber {
                    index,
                    tenant: tenant.clone(),
                });
            }
            Some(number.to_owned())
        }
    };
    let hold_prompt = match raw.hold_prompt_file {
        None => None,
        Some(path) => Some(read_hold_prompt(index, &tenant, path.trim(), files)?),
    };
    // The core's parser, so the seed accepts exactly the names the bridge does (`OpenAI` as
    // well as `openai`); the store keeps the canonical lowercase name. An empty value is a
    // mistake, not "the default": leaving the key out says that.
    let provider = match raw.provider {
        None => None,
        Some(name) => Some(
            name.parse::<Provider>()
                .map_err(|_| SeedError::UnknownProvider {
                    index,
                    tenant: tenant.clone(),
                })?,
        ),
    };
    let model = match raw.model {
        None => None,
        Some(model) => {
            let model = model.trim();
            if !is_valid_model_id(model) {
                return Err(SeedError::InvalidModel {
                    index,
                    tenant: tenant.clone(),
                });
            }
            Some(model.to_owned())
        }
    };

    Ok(SeedTenant {
        id,
        agent_name,
        voice,
        greeting,
        instructions,
        audio_mode,
        language,
        max_call_seconds: raw.max_call_seconds,
        tools,
        business_hours: BusinessHours {
            timezone: hours.timezone.trim().to_owned(),
            days,
        },
        numbers,
        fallback_number,
        hold_prompt,
        provider,
        model,
        record: raw.record,
    })
}

fn read_hold_prompt(
    index: usize,
    tenant: &str,
    path: &str,
    files: &SeedFiles,
) -> Result<Vec<u8>, SeedError> {
    if path.is_empty() {
        return Err(SeedError::EmptyField {
            index,
            tenant: tenant.to_owned(),
            field: "hold_prompt_file",
        });
    }
    let bytes = files.read(path, MAX_HOLD_PROMPT_BYTES).map_err(|source| {
        SeedError::HoldPromptUnreadable {
            index,
            tenant: tenant.to_owned(),
            source,
        }
    })?;
    if bytes.is_empty() || bytes.len() > MAX_HOLD_PROMPT_BYTES {
        return Err(SeedError::HoldPromptSize {
            index,
            tenant: tenant.to_owned(),
        });
    }
    Ok(bytes)
}

/// Tenant ids become the first segment of every memory namespace and appear in URLs, so they
/// are limited to characters that need no escaping anywhere and can never contain a `/`.
pub fn is_valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TENANT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A model id as providers spell them (`gpt-realtime`, `gemini-3.8-live`,
/// `gpt-realtime-2025-08-28`): 1 to [`MAX_MODEL_ID_LEN`] characters of `[A-Za-z0-9._-]`. The
/// bridge puts it in a connect URL or a setup message, so nothing there needs escaping; whether
/// the provider knows the model is for the provider to say at the next call.
pub fn is_valid_model_id(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL_ID_LEN
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `+`, then 2 to 15 digits, the first not 0 (ITU-T E.164).
pub fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `HH:MM-HH:MM`, both times valid on a 24-hour clock (`24:00` allowed as a closing time) and
/// the opening strictly before the closing.
fn parse_open_hours(text: &str) -> Option<OpenHours> {
    let (opens, closes) = text.split_once('-')?;
    let (opens, closes) = (opens.trim(), closes.trim());
    let open_minutes = minutes_of(opens)?;
    let close_minutes = minutes_of(closes)?;
    (open_minutes < close_minutes && open_minutes < 24 * 60).then(|| OpenHours {
        opens: opens.to_owned(),
        closes: closes.to_owned(),
    })
}

fn minutes_of(time: &str) -> Option<u32> {
    let (hours, minutes) = time.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: u32 = hours.parse().ok()?;
    let minutes: u32 = minutes.parse().ok()?;
    let total = hours * 60 + minutes;
    (minutes < 60 && total <= 24 * 60).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;

    const MINIMAL: &str = r#"
        [[tenants]]
        id = "t1"
        agent_name = "Ada"
        voice = "marin"
        instructions = "Be brief."
        audio_mode = "pcmu"
        language = "en-US"
    "#;

    /// Text whose files (if it names any) are the shipped ones.
    fn parse(text: &str) -> Result<Seed, SeedError> {
        Seed::parse(text, &SeedFiles::Shipped)
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

    #[test]
    fn a_tenant_may_turn_recording_on_or_off_or_leave_it_to_the_bridge() {
        for (line, expected) in [
            ("record = true", Some(true)),
            ("record = false", Some(false)),
            ("", None),
        ] {
            let seed =
                parse(&format!("{MINIMAL}\nnumbers = [\"+15550100001\"]\n{line}")).expect("seed");
            assert_eq!(seed.tenants[0].record, expected, "{line:?}");
        }
        assert!(parse(&format!("{MINIMAL}\nrecord = \"yes\"")).is_err());
    }

    #[test]
    fn the_fixture_parses_with_both_audio_modes_and_every_tenant_numbered() {
        let seed = SeedSource::shipped().parse().expect("fixture");
        assert!(seed.tenants.len() >= 2);
        for mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
            assert!(seed.tenants.iter().any(|t| t.audio_mode == mode), "{mode}");
        }
        assert!(seed.tenants.iter().all(|t| !t.numbers.is_empty()));
    }

    #[test]
    fn the_fixture_names_a_fallback_and_a_hold_prompt_read_alike_from_disk_and_compiled_in() {
        let shipped = SeedSource::shipped().parse().expect("shipped");
        let on_disk = SeedSource::read(&Path::new(FIXTURES).join("tenants.toml"))
            .expect("read")
            .parse()
            .expect("on disk");
        assert_eq!(shipped, on_disk);
        let file = std::fs::read(Path::new(FIXTURES).join("hold-prompt-8k-mulaw.raw"))
            .expect("prompt fixture");
        assert!(
            shipped
                .tenants
                .iter()
                .any(|t| t.hold_prompt.as_deref() == Some(&file[..]))
        );
        assert!(
            shipped
                .tenants
                .iter()
                .filter_map(|t| t.fallback_number.as_deref())
                .any(api::is_e164)
        );
    }

    #[test]
    fn a_bad_fallback_number_is_refused_naming_the_tenant() {
        // Seed numbers may be as short as 2 digits; a fallback must pass the bridge's check.
        for bad in ["5550100999", "+0550100999", "+1555", "+1 555 0100", ""] {
            let text = format!("{MINIMAL}\nfallback_number = \"{bad}\"");
            let error = parse(&text).expect_err(bad);
            assert!(
                matches!(&error, SeedError::InvalidFallbackNumber { index: 1, tenant } if tenant == "t1"),
                "{bad:?} => {error:?}"
            );
            assert!(error.to_string().contains("(t1)"), "{error}");
        }
        let seed = parse(&format!("{MINIMAL}\nfallback_number = \" +15550100999 \""))
            .expect("good number");
        assert_eq!(
            seed.tenants[0].fallback_number.as_deref(),
            Some("+15550100999")
        );
    }

    #[test]
    fn hold_prompt_files_are_read_beside_the_seed_and_bounded() {
        let dir = TempDir::new("hold-prompt");
        let write = |name: &str, len: usize| {
            std::fs::write(dir.0.join(name), vec![0x7f_u8; len]).expect("write");
        };
        write("full.raw", MAX_HOLD_PROMPT_BYTES);
        write("over.raw", MAX_HOLD_PROMPT_BYTES + 1);
        write("empty.raw", 0);
        std::fs::create_dir(dir.0.join("sub")).expect("mkdir");
        write("sub/short.raw", 800);
        let seed_path = dir.0.join("tenants.toml");
        let with_file = |name: &str| {
            std::fs::write(
                &seed_path,
                format!("{MINIMAL}\nhold_prompt_file = \"{name}\""),
            )
            .expect("write seed");
            SeedSource::read(&seed_path).expect("read seed").parse()
        };
        let prompt = |seed: Seed| seed.tenants[0].hold_prompt.as_ref().map(Vec::len);
        assert_eq!(
            with_file("full.raw").map(prompt).expect("at the limit"),
            Some(MAX_HOLD_PROMPT_BYTES)
        );
        assert_eq!(
            with_file("sub/short.raw").map(prompt).expect("below"),
            Some(800)
        );
        for name in ["over.raw", "empty.raw"] {
            assert!(
                matches!(
                    with_file(name),
                    Err(SeedError::HoldPromptSize { index: 1, ref tenant }) if tenant == "t1"
                ),
                "{name}"
            );
        }
        let absolute = dir.0.join("full.raw");
        for name in ["missing.raw", "sub", absolute.to_str().expect("utf-8")] {
            assert!(
                matches!(
                    with_file(name),
                    Err(SeedError::HoldPromptUnreadable { index: 1, .. })
                ),
                "{name}"
            );
        }
        assert!(matches!(
            with_file(" "),
            Err(SeedError::EmptyField {
                field: "hold_prompt_file",
                ..
            })
        ));
        // Compiled-in files are the shipped ones only.
        assert!(matches!(
            parse(&format!("{MINIMAL}\nhold_prompt_file = \"full.raw\"")),
            Err(SeedError::HoldPromptUnreadable { .. })
        ));
    }

    #[test]
    fn a_minimal_tenant_has_no_greeting_tools_numbers_or_hours() {
        let seed = parse(MINIMAL).expect("minimal");
        let tenant = &seed.tenants[0];
        assert_eq!(tenant.greeting, None);
        assert!(tenant.tools.is_empty() && tenant.numbers.is_empty());
        assert_eq!(
            tenant.business_hours.days,
            <[Option<OpenHours>; 7]>::default()
        );
        assert_eq!(tenant.max_call_seconds, 0);
    }

    #[test]
    fn hours_parse_and_bad_hours_name_the_day() {
        let text = format!(
            "{MINIMAL}\n[tenants.business_hours]\ntimezone = \"Europe/Rome\"\nmonday = \"09:00-17:30\"\nsunday = \"closed\"\nfriday = \"00:00-24:00\""
        );
        let seed = parse(&text).expect("hours");
        let hours = &seed.tenants[0].business_hours;
        assert_eq!(hours.timezone, "Europe/Rome");
        assert_eq!(
            hours.days[0],
            Some(OpenHours {
                opens: "09:00".into(),
                closes: "17:30".into()
            })
        );
        assert_eq!(hours.days[6], None);
        assert!(hours.days[4].is_some());
        for bad in [
            "17:00-09:00",
            "9:00-17:00",
            "09:00-09:00",
            "09:60-10:00",
            "24:00-24:30",
            "open",
        ] {
            let text = format!("{MINIMAL}\n[tenants.business_hours]\ntuesday = \"{bad}\"");
            assert!(
                matches!(
                    parse(&text),
                    Err(SeedError::InvalidHours { day: "tuesday", .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_seeds_are_refused_with_the_field_named() {
        let with = |edit: &str| format!("{MINIMAL}\n{edit}");
        let second = |body: &str| {
            format!(
                "{MINIMAL}\nnumbers = [\"+15550100001\"]\n[[tenants]]\nagent_name = \"B\"\nvoice = \"cedar\"\ninstructions = \"x\"\naudio_mode = \"pcm16\"\nlanguage = \"en\"\n{body}"
            )
        };
        type Check = fn(&SeedError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("".into(), |e| matches!(e, SeedError::NoTenants)),
            (with("color = \"red\""), |e| matches!(e, SeedError::Toml(_))),
            (MINIMAL.replace("\"t1\"", "\"t/1\""), |e| {
                matches!(e, SeedError::InvalidTenantId { index: 1 })
            }),
            (MINIMAL.replace("\"Ada\"", "\"  \""), |e| {
                matches!(
                    e,
                    SeedError::EmptyField {
                        field: "agent_name",
                        ..
                    }
                )
            }),
            (MINIMAL.replace("\"pcmu\"", "\"opus\""), |e| {
                matches!(e, SeedError::InvalidAudioMode { .. })
            }),
            (
                with("tools = [\"take_message\", \"launch_rockets\"]"),
                |e| matches!(e, SeedError::UnknownTool { position: 2, .. }),
            ),
            (with("tools = [\"take_message\", \"take_message\"]"), |e| {
                matches!(e, SeedError::DuplicateTool { position: 2, .. })
            }),
            (with("numbers = [\"5550100001\"]"), |e| {
                matches!(e, SeedError::InvalidNumber { position: 1, .. })
            }),
            (with("numbers = [\"+0550100001\"]"), |e| {
                matches!(e, SeedError::InvalidNumber { .. })
            }),
            (second("id = \"t1\""), |e| {
                matches!(e, SeedError::DuplicateTenant { index: 2, .. })
            }),
            (second("id = \"t2\"\nnumbers = [\"+15550100001\"]"), |e| {
                matches!(e, SeedError::DuplicateNumber { index: 2, .. })
            }),
        ];
        for (text, expected) in cases {
            let error = parse(&text).expect_err(&text);
            assert!(expected(&error), "{text}\n=> {error:?}");
        }
    }

    #[test]
    fn the_fixture_has_a_tenant_on_gemini_with_its_own_number() {
        let seed = SeedSource::shipped().parse().expect("fixture");
        let gemini: Vec<&SeedTenant> = seed
            .tenants
            .iter()
            .filter(|t| t.provider == Some(Provider::Gemini))
            .collect();
        assert_eq!(gemini.len(), 1);
        let tenant = gemini[0];
        assert_eq!(tenant.model.as_deref(), Some("gemini-3.8-live"));
        assert_eq!(tenant.voice, "Kore");
        assert!(!tenant.numbers.is_empty() && tenant.fallback_number.is_some());
        // The others stay on the bridge's defaults.
        assert!(
            seed.tenants
                .iter()
                .filter(|t| t.id != tenant.id)
                .all(|t| t.provider.is_none() && t.model.is_none())
        );
    }

    #[test]
    fn provider_and_model_are_optional_and_checked() {
        let with = |lines: &str| parse(&format!("{MINIMAL}\n{lines}"));
        let tenant = |seed: Seed| {
            let tenant = seed.tenants.into_iter().next().expect("one tenant");
            (tenant.provider, tenant.model)
        };
        assert_eq!(tenant(parse(MINIMAL).expect("minimal")), (None, None));
        assert_eq!(
            tenant(with("provider = \"gemini\"\nmodel = \" gemini-3.8-live \"").expect("gemini")),
            (Some(Provider::Gemini), Some("gemini-3.8-live".into()))
        );
        // The bridge's own parser: the names it accepts in VOXRELAY_PROVIDER.
        assert_eq!(
            tenant(with("provider = \"OpenAI\"").expect("openai")),
            (Some(Provider::OpenAi), None)
        );
        // A model without a provider is the bridge's default provider's.
        assert_eq!(
            tenant(with("model = \"gpt-realtime-2025-08-28\"").expect("model")),
            (None, Some("gpt-realtime-2025-08-28".into()))
        );
        for bad in ["anthropic", "", "open ai"] {
            let error = with(&format!("provider = \"{bad}\"")).expect_err(bad);
            assert!(
                matches!(&error, SeedError::UnknownProvider { index: 1, tenant } if tenant == "t1"),
                "{bad:?} => {error:?}"
            );
            assert!(error.to_string().contains("(t1)"), "{error}");
        }
        let too_long = "m".repeat(MAX_MODEL_ID_LEN + 1);
        for bad in [
            "",
            " ",
            "gpt realtime",
            "models/gemini-3.8-live",
            "gpt?x=1",
            &too_long,
        ] {
            let error = with(&format!("model = \"{bad}\"")).expect_err(bad);
            assert!(
                matches!(&error, SeedError::InvalidModel { index: 1, tenant } if tenant == "t1"),
                "{bad:?} => {error:?}"
            );
            assert!(error.to_string().contains("(t1)"), "{error}");
            assert!(
                !error.to_string().contains("gpt"),
                "no value echoed: {error}"
            );
        }
        assert!(with(&format!("model = \"{}\"", "m".repeat(MAX_MODEL_ID_LEN))).is_ok());
    }

    #[test]
    fn errors_do_not_echo_values() {
        let text = MINIMAL.replace("\"pcmu\"", "\"secret-ish value\"");
        let error = parse(&text).expect_err("bad mode");
        assert!(!error.to_string().contains("secret-ish"), "{error}");
    }

    #[test]
    fn ids_and_numbers_follow_their_rules() {
        assert!(is_valid_tenant_id("acme_dental-2"));
        assert!(!is_valid_tenant_id(""));
        assert!(!is_valid_tenant_id("a/b"));
        assert!(!is_valid_tenant_id(&"a".repeat(65)));
        assert!(is_e164("+15550100001"));
        assert!(!is_e164("+1"));
        assert!(!is_e164("+1555010000100000"));
        assert!(!is_e164("+1 555"));
    }
}
