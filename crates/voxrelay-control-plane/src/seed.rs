//! The reference control plane's seed file: tenants, their numbers, tools and business hours,
//! parsed from TOML and validated before anything touches the database.
//!
//! Owns the seed format (see `fixtures/tenants.toml` and `docs/control-plane-api.md`, part 3)
//! and its rules. Invariants of a [`Seed`] that parsed: tenant ids are unique and safe as a
//! memory-namespace prefix (`[A-Za-z0-9_-]`, so never a `/`); every number is E.164 and belongs
//! to exactly one tenant; every tool is one of [`tools::TOOL_NAMES`](super::tools::TOOL_NAMES)
//! and listed once; opening hours are `HH:MM-HH:MM` with the opening before the closing. Errors
//! name the tenant (by index and id) and the field, never a whole value.

use std::collections::HashSet;

use serde::Deserialize;

pub use super::hours::{BusinessHours, OpenHours, WEEKDAYS};
use super::tools::Tool;
use voxrelay_core::AudioMode;

/// Longest tenant id accepted: it prefixes every memory namespace.
const MAX_TENANT_ID_LEN: usize = 64;

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
    /// Parses and validates a seed file's text.
    pub fn parse(text: &str) -> Result<Self, SeedError> {
        let raw: RawSeed = toml::from_str(text)?;
        if raw.tenants.is_empty() {
            return Err(SeedError::NoTenants);
        }
        let mut tenant_ids = HashSet::new();
        let mut numbers = HashSet::new();
        let mut tenants = Vec::with_capacity(raw.tenants.len());
        for (position, raw_tenant) in raw.tenants.into_iter().enumerate() {
            let tenant = validate_tenant(position + 1, raw_tenant, &mut numbers)?;
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
    })
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

    const MINIMAL: &str = r#"
        [[tenants]]
        id = "t1"
        agent_name = "Ada"
        voice = "marin"
        instructions = "Be brief."
        audio_mode = "pcmu"
        language = "en-US"
    "#;

    #[test]
    fn the_fixture_parses_with_two_tenants_and_their_numbers() {
        let seed = Seed::parse(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/tenants.toml"
        )))
        .expect("fixture");
        assert!(seed.tenants.len() >= 2);
        for mode in [AudioMode::Pcmu, AudioMode::Pcm16] {
            assert!(seed.tenants.iter().any(|t| t.audio_mode == mode), "{mode}");
        }
        assert!(seed.tenants.iter().all(|t| !t.numbers.is_empty()));
    }

    #[test]
    fn a_minimal_tenant_has_no_greeting_tools_numbers_or_hours() {
        let seed = Seed::parse(MINIMAL).expect("minimal");
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
        let seed = Seed::parse(&text).expect("hours");
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
                    Seed::parse(&text),
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
            let error = Seed::parse(&text).expect_err(&text);
            assert!(expected(&error), "{text}\n=> {error:?}");
        }
    }

    #[test]
    fn errors_do_not_echo_values() {
        let text = MINIMAL.replace("\"pcmu\"", "\"secret-ish value\"");
        let error = Seed::parse(&text).expect_err("bad mode");
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
