//! The reference control plane's two example tools, `lookup_business_hours` and `take_message`:
//! their OpenAI function definitions, the check of the model's arguments against them, and the
//! output the model is given.
//!
//! Pure: the database side lives in [`super::store`]. Invariant: [`Tool::parse_arguments`]
//! accepts exactly what [`Tool::definition`]'s JSON schema allows (an object with only the
//! declared properties, the right types, lengths and patterns), so a model that follows the
//! schema is never refused and one that does not never reaches the database.

use serde_json::{Value, json};

use super::hours::{BusinessHours, OpenHours, WEEKDAYS};

/// Every tool this control plane implements, by name.
pub const TOOL_NAMES: [&str; 2] = ["lookup_business_hours", "take_message"];

const MAX_CALLER_NAME_CHARS: usize = 100;
const MAX_MESSAGE_CHARS: usize = 2000;
const MIN_CALLBACK_CHARS: usize = 3;
const MAX_CALLBACK_CHARS: usize = 32;
/// The schema's pattern for `callback_number`; [`is_callback_number`] is its Rust twin.
const CALLBACK_PATTERN: &str = "^[0-9+() .-]{3,32}$";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tool {
    LookupBusinessHours,
    TakeMessage,
}

/// The arguments of one tool call, checked against the tool's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolArguments {
    /// `day` is an index into [`WEEKDAYS`]; `None` asks for the whole week.
    LookupBusinessHours { day: Option<usize> },
    TakeMessage {
        caller_name: String,
        callback_number: String,
        message: String,
    },
}

/// The arguments do not fit the tool's schema. Deliberately without detail: the answer is
/// `422 {"error":"bad_arguments"}` and the model is told no more than that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the arguments do not fit the tool's schema")]
pub struct BadArguments;

impl Tool {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "lookup_business_hours" => Some(Self::LookupBusinessHours),
            "take_message" => Some(Self::TakeMessage),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::LookupBusinessHours => TOOL_NAMES[0],
            Self::TakeMessage => TOOL_NAMES[1],
        }
    }

    /// The OpenAI Realtime function definition the context's `tools` lists.
    pub fn definition(self) -> Value {
        match self {
            Self::LookupBusinessHours => json!({
                "type": "function",
                "name": self.name(),
                "description": "Look up when the business is open. Without a day, returns the \
                    opening hours for the whole week. Times are local to the business's timezone.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "day": {
                            "type": "string",
                            "enum": WEEKDAYS,
                            "description": "The day of the week to look up, in lowercase English."
                        }
                    },
                    "required": [],
                    "additionalProperties": false
                }
            }),
            Self::TakeMessage => json!({
                "type": "function",
                "name": self.name(),
                "description": "Take a message for the business so that someone calls the \
                    caller back. Confirm the name and callback number with the caller first.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "caller_name": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_CALLER_NAME_CHARS,
                            "description": "The caller's name."
                        },
                        "callback_number": {
                            "type": "string",
                            "pattern": CALLBACK_PATTERN,
                            "description": "The phone number to call back, digits with optional +, spaces, dashes, dots or parentheses."
                        },
                        "message": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_MESSAGE_CHARS,
                            "description": "The message, in the caller's words."
                        }
                    },
                    "required": ["caller_name", "callback_number", "message"],
                    "additionalProperties": false
                }
            }),
        }
    }

    /// Checks the model's arguments against [`Tool::definition`]'s schema.
    pub fn parse_arguments(self, arguments: &Value) -> Result<ToolArguments, BadArguments> {
        let object = arguments.as_object().ok_or(BadArguments)?;
        let allowed: &[&str] = match self {
            Self::LookupBusinessHours => &["day"],
            Self::TakeMessage => &["caller_name", "callback_number", "message"],
        };
        if object.keys().any(|key| !allowed.contains(&key.as_str())) {
            return Err(BadArguments);
        }
        let string = |name: &str| -> Result<Option<&str>, BadArguments> {
            match object.get(name) {
                None => Ok(None),
                Some(Value::String(text)) => Ok(Some(text)),
                Some(_) => Err(BadArguments),
            }
        };
        match self {
            Self::LookupBusinessHours => {
                let day = match string("day")? {
                    None => None,
                    Some(day) => Some(
                        WEEKDAYS
                            .iter()
                            .position(|known| *known == day)
                            .ok_or(BadArguments)?,
                    ),
                };
                Ok(ToolArguments::LookupBusinessHours { day })
            }
            Self::TakeMessage => {
                let caller_name = string("caller_name")?.ok_or(BadArguments)?;
                let callback_number = string("callback_number")?.ok_or(BadArguments)?;
                let message = string("message")?.ok_or(BadArguments)?;
                // JSON schema lengths count characters (code points), not bytes.
                let fits = |text: &str, max: usize| (1..=max).contains(&text.chars().count());
                if !fits(caller_name, MAX_CALLER_NAME_CHARS)
                    || !fits(message, MAX_MESSAGE_CHARS)
                    || !is_callback_number(callback_number)
                {
                    return Err(BadArguments);
                }
                Ok(ToolArguments::TakeMessage {
                    caller_name: caller_name.to_owned(),
                    callback_number: callback_number.to_owned(),
                    message: message.to_owned(),
                })
            }
        }
    }
}

/// [`CALLBACK_PATTERN`] without a regex engine.
fn is_callback_number(text: &str) -> bool {
    (MIN_CALLBACK_CHARS..=MAX_CALLBACK_CHARS).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'(' | b')' | b' ' | b'.' | b'-'))
}

/// `lookup_business_hours`'s output: one day (`day` an index into [`WEEKDAYS`]) or, for `None`
/// (or an index out of range, which [`Tool::parse_arguments`] never produces), the week.
pub fn business_hours_output(hours: &BusinessHours, day: Option<usize>) -> Value {
    let describe = |name: &str, open: Option<&OpenHours>| match open {
        Some(open) => {
            json!({"day": name, "open": true, "opens": open.opens, "closes": open.closes})
        }
        None => json!({"day": name, "open": false}),
    };
    if let Some((name, open)) = day.and_then(|index| WEEKDAYS.get(index).zip(hours.days.get(index)))
    {
        let mut answer = describe(name, open.as_ref());
        answer["timezone"] = json!(hours.timezone);
        return answer;
    }
    json!({
        "timezone": hours.timezone,
        "week": WEEKDAYS
            .iter()
            .zip(&hours.days)
            .map(|(name, open)| describe(name, open.as_ref()))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for name in TOOL_NAMES {
            assert_eq!(Tool::from_name(name).map(Tool::name), Some(name));
        }
        assert_eq!(Tool::from_name("Take_Message"), None);
        assert_eq!(Tool::from_name(""), None);
    }

    #[test]
    fn definitions_are_openai_function_definitions() {
        for name in TOOL_NAMES {
            let tool = Tool::from_name(name).expect("known");
            let definition = tool.definition();
            assert_eq!(definition["type"], "function");
            assert_eq!(definition["name"], name);
            assert!(
                definition["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty())
            );
            assert_eq!(definition["parameters"]["type"], "object");
            assert_eq!(definition["parameters"]["additionalProperties"], false);
        }
    }

    #[test]
    fn lookup_business_hours_takes_an_optional_lowercase_day() {
        let tool = Tool::LookupBusinessHours;
        assert_eq!(
            tool.parse_arguments(&json!({})),
            Ok(ToolArguments::LookupBusinessHours { day: None })
        );
        assert_eq!(
            tool.parse_arguments(&json!({"day": "sunday"})),
            Ok(ToolArguments::LookupBusinessHours { day: Some(6) })
        );
        for bad in [
            json!({"day": "Sunday"}),
            json!({"day": "someday"}),
            json!({"day": 1}),
            json!({"day": null}),
            json!({"when": "monday"}),
            json!([]),
            json!("monday"),
            Value::Null,
        ] {
            assert_eq!(tool.parse_arguments(&bad), Err(BadArguments), "{bad}");
        }
    }

    #[test]
    fn take_message_needs_all_three_fields_within_bounds() {
        let tool = Tool::TakeMessage;
        let good = json!({"caller_name": "Zoë", "callback_number": "+1 (555) 010-0199", "message": "Call me."});
        assert_eq!(
            tool.parse_arguments(&good),
            Ok(ToolArguments::TakeMessage {
                caller_name: "Zoë".into(),
                callback_number: "+1 (555) 010-0199".into(),
                message: "Call me.".into(),
            })
        );
        let long_name = "é".repeat(MAX_CALLER_NAME_CHARS);
        assert!(
            tool.parse_arguments(
                &json!({"caller_name": long_name, "callback_number": "555", "message": "x"})
            )
            .is_ok(),
            "a limit counts characters, not bytes"
        );
        for bad in [
            json!({"caller_name": "A", "callback_number": "555"}),
            json!({"caller_name": "", "callback_number": "555", "message": "x"}),
            json!({"caller_name": "A", "callback_number": "55", "message": "x"}),
            json!({"caller_name": "A", "callback_number": "call me", "message": "x"}),
            json!({"caller_name": "A", "callback_number": "5".repeat(33), "message": "x"}),
            json!({"caller_name": "A", "callback_number": "555", "message": "x".repeat(2001)}),
            json!({"caller_name": "A", "callback_number": 5550100, "message": "x"}),
            json!({"caller_name": "A", "callback_number": "555", "message": "x", "urgent": true}),
        ] {
            assert_eq!(tool.parse_arguments(&bad), Err(BadArguments), "{bad}");
        }
    }

    #[test]
    fn business_hours_output_names_days_and_the_timezone() {
        let mut hours = BusinessHours {
            timezone: "Europe/Rome".into(),
            ..BusinessHours::default()
        };
        hours.days[0] = Some(OpenHours {
            opens: "09:00".into(),
            closes: "17:00".into(),
        });
        assert_eq!(
            business_hours_output(&hours, Some(0)),
            json!({"day": "monday", "open": true, "opens": "09:00", "closes": "17:00", "timezone": "Europe/Rome"})
        );
        assert_eq!(
            business_hours_output(&hours, Some(6)),
            json!({"day": "sunday", "open": false, "timezone": "Europe/Rome"})
        );
        let week = business_hours_output(&hours, None);
        assert_eq!(week["week"].as_array().map(Vec::len), Some(7));
        assert_eq!(week["week"][1], json!({"day": "tuesday", "open": false}));
    }
}
