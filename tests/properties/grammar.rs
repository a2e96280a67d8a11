//! Generators shared by the properties: hostile strings, numeric fields as Twilio sends them
//! and as an attacker might, JSON objects written field by field (so a field can be missing,
//! repeated or of the wrong type), the recorded fixtures as seeds, and a text mutator.
//!
//! Messages are built as JSON text rather than as `serde_json::Value`, because a value cannot
//! hold a repeated key, a field order or a broken escape, and those are what a peer can send.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;

/// The stream SID of the recorded Twilio fixture.
pub const SID: &str = "MZ00000000000000000000000000000001";
pub const OTHER_SID: &str = "MZ00000000000000000000000000000002";
pub const CALL_SID: &str = "CA00000000000000000000000000000001";

pub const TWILIO_INBOUND: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/twilio-media-streams/inbound.jsonl"
));
pub const OPENAI_SERVER_EVENTS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/openai-realtime-ga/server-events.jsonl"
));

pub fn fixture_lines(text: &'static str) -> Vec<&'static str> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .collect()
}

/// The fixture line whose `event` is `event`.
pub fn twilio_fixture(event: &str) -> &'static str {
    fixture_lines(TWILIO_INBOUND)
        .into_iter()
        .find(|line| line.contains(&format!("\"event\": \"{event}\"")))
        .expect("the fixture has the event")
}

/// `value` as a JSON string literal.
pub fn json_str(value: &str) -> String {
    serde_json::to_string(value).expect("a str always serialises")
}

/// A JSON object with `fields` (raw JSON values) in this order, repeats kept.
pub fn object(fields: &[(String, String)]) -> String {
    let mut out = String::from("{");
    for (index, (key, value)) in fields.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        out.push_str(&json_str(key));
        out.push(':');
        out.push_str(value);
    }
    out.push('}');
    out
}

fn field(key: &str, value: String) -> (String, String) {
    (key.to_owned(), value)
}

/// Strings a peer controls: any Unicode, JSON's special characters, control characters, line
/// separators, long runs (up to just over the 64 KiB message cap), id-shaped text.
pub fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        3 => "[ -~]{0,24}",
        2 => prop::sample::select(vec![
            "", "\n", "\r\n", "\"", "\\", "\u{0}", "\u{7f}", "\u{2028}", "\u{feff}", "é",
            "\u{10FFFF}", "{}", "[", "null", "inbound", "outbound", "0", "-1",
            "18446744073709551615", "../../etc/passwd", "%00", "\u{1b}[2J",
        ])
        .prop_map(str::to_owned),
        1 => "(MZ|CA|AC)[0-9a-fA-F]{30,34}",
        1 => (0usize..=70_000, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n / c.len_utf8().max(1))),
    ]
    .boxed()
}

/// A small hostile string, for fields that are multiplied (ids, keys).
pub fn short_hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        3 => "[ -~]{0,12}",
        1 => prop::sample::select(vec!["", "\n", "\"", "\\", "\u{0}", "\u{2028}", "é"])
            .prop_map(str::to_owned),
    ]
    .boxed()
}

/// How a generated message's numeric fields are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numbers {
    /// Decimal strings below 5000, as a real stream sends (the call engine's gap accounting on
    /// `main` costs one step per missing number, so properties that drive it stay here).
    Realistic,
    /// Anything: `u64::MAX`, values past it, signs, exponents, fullwidth digits, escapes,
    /// JSON numbers instead of strings, 20,000-digit strings.
    Hostile,
}

/// The raw JSON value of a numeric field Twilio sends as a decimal string.
pub fn decimal_field(numbers: Numbers) -> BoxedStrategy<String> {
    let realistic = (0u64..5000).prop_map(|n| json_str(&n.to_string()));
    match numbers {
        Numbers::Realistic => realistic.boxed(),
        Numbers::Hostile => prop_oneof![
            4 => realistic,
            2 => any::<u64>().prop_map(|n| json_str(&n.to_string())),
            2 => (0u64..=3).prop_map(|below| json_str(&(u64::MAX - below).to_string())),
            2 => prop::sample::select(vec![
                "\"18446744073709551616\"", "\"99999999999999999999999999\"", "\"-1\"", "\"\"",
                "\"1e3\"", "\" 1\"", "\"1 \"", "\"+1\"", "\"0x1f\"", "\"\u{ff11}\"", "\"\\u0031\"",
                "\"0000000000000000000000000001\"", "null", "7", "-0", "1.5", "1e400", "[]",
                "{}", "true",
            ])
            .prop_map(str::to_owned),
            1 => (1usize..20_000).prop_map(|n| json_str(&"9".repeat(n))),
            1 => hostile_string().prop_map(|text| json_str(&text)),
        ]
        .boxed(),
    }
    .boxed()
}

/// Any JSON value, nested a few levels, with hostile strings and extreme numbers.
pub fn any_json() -> BoxedStrategy<serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        short_hostile_string().prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec((short_hostile_string(), inner), 0..6)
                .prop_map(|pairs| serde_json::Value::Object(pairs.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Valid base64 of up to `max_bytes` bytes, or something that is not base64.
pub fn payload(max_bytes: usize) -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::collection::vec(any::<u8>(), 0..=max_bytes).prop_map(|bytes| BASE64.encode(bytes)),
        1 => prop::sample::select(vec!["=", "A", "AA=", "AAA", "@@@@", "AA==AA==", "AA\n=="])
            .prop_map(str::to_owned),
        1 => hostile_string(),
    ]
    .boxed()
}

/// What happens to a message's top-level fields after it is built.
#[derive(Clone, Debug)]
pub enum FieldMutation {
    Drop(prop::sample::Index),
    Repeat(prop::sample::Index),
    Retype(prop::sample::Index, serde_json::Value),
    Add(String, serde_json::Value),
}

fn field_mutation() -> BoxedStrategy<FieldMutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(FieldMutation::Drop),
        any::<prop::sample::Index>().prop_map(FieldMutation::Repeat),
        (any::<prop::sample::Index>(), any_json()).prop_map(|(i, v)| FieldMutation::Retype(i, v)),
        (
            prop::sample::select(vec![
                "event",
                "streamSid",
                "sequenceNumber",
                "start",
                "media",
                "mark",
                "dtmf",
                "stop",
                "type",
                "x",
            ])
            .prop_map(str::to_owned),
            any_json()
        )
            .prop_map(|(k, v)| FieldMutation::Add(k, v)),
    ]
    .boxed()
}

fn mutate_fields(fields: &mut Vec<(String, String)>, mutations: &[FieldMutation]) {
    for mutation in mutations {
        match mutation {
            FieldMutation::Drop(index) if !fields.is_empty() => {
                fields.remove(index.index(fields.len()));
            }
            FieldMutation::Repeat(index) if !fields.is_empty() => {
                let copy = fields[index.index(fields.len())].clone();
                fields.push(copy);
            }
            FieldMutation::Retype(index, value) if !fields.is_empty() => {
                let at = index.index(fields.len());
                fields[at].1 = value.to_string();
            }
            FieldMutation::Add(key, value) => fields.push((key.clone(), value.to_string())),
            _ => {}
        }
    }
}

/// Mostly the stream's own SID, sometimes another stream's, sometimes anything.
fn stream_sid() -> BoxedStrategy<String> {
    prop_oneof![
        8 => Just(json_str(SID)),
        1 => Just(json_str(OTHER_SID)),
        1 => hostile_string().prop_map(|text| json_str(&text)),
    ]
    .boxed()
}

fn maybe<T: std::fmt::Debug + Clone + 'static>(
    strategy: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop_oneof![1 => Just(None), 5 => strategy.prop_map(Some)]
}

fn start_body(numbers: Numbers) -> BoxedStrategy<String> {
    let params = prop_oneof![
        6 => prop::collection::vec((short_hostile_string(), short_hostile_string()), 0..6),
        1 => (0usize..600).prop_map(|n| (0..n).map(|i| (format!("p{i}"), "v".repeat(i % 7))).collect()),
    ];
    let encoding = prop_oneof![
        8 => Just(json_str("audio/x-mulaw")),
        1 => Just(json_str("audio/x-alaw")),
        1 => hostile_string().prop_map(|text| json_str(&text)),
    ];
    let small_number = move |usual: u32| {
        prop_oneof![
            8 => Just(usual.to_string()),
            1 => any::<u32>().prop_map(|n| n.to_string()),
            1 => decimal_field(numbers),
        ]
    };
    (
        stream_sid(),
        maybe(stream_sid()),
        prop_oneof![4 => Just(json_str(CALL_SID)), 1 => hostile_string().prop_map(|t| json_str(&t))],
        encoding,
        small_number(8000),
        small_number(1),
        params,
        any::<bool>(),
    )
        .prop_map(
            |(account, inner_sid, call_sid, encoding, rate, channels, params, tracks)| {
                let format = object(&[
                    field("encoding", encoding),
                    field("sampleRate", rate),
                    field("channels", channels),
                ]);
                let params: Vec<(String, String)> = params
                    .into_iter()
                    .map(|(key, value)| (key, json_str(&value)))
                    .collect();
                let mut fields = vec![field("accountSid", account), field("callSid", call_sid)];
                if let Some(inner_sid) = inner_sid {
                    fields.push(field("streamSid", inner_sid));
                }
                if tracks {
                    fields.push(field("tracks", r#"["inbound"]"#.to_owned()));
                }
                fields.push(field("mediaFormat", format));
                fields.push(field("customParameters", object(&params)));
                object(&fields)
            },
        )
    .boxed()
}

fn media_body(numbers: Numbers) -> BoxedStrategy<String> {
    (
        maybe(prop_oneof![
            6 => Just("inbound".to_owned()),
            1 => Just("outbound".to_owned()),
            1 => short_hostile_string(),
        ]),
        decimal_field(numbers),
        decimal_field(numbers),
        payload(400),
    )
        .prop_map(|(track, chunk, timestamp, payload)| {
            let mut fields = Vec::new();
            if let Some(track) = track {
                fields.push(field("track", json_str(&track)));
            }
            fields.push(field("chunk", chunk));
            fields.push(field("timestamp", timestamp));
            fields.push(field("payload", json_str(&payload)));
            object(&fields)
        })
        .boxed()
}

/// A mark name: ours (`generation:item:ms`, any numbers) or anything.
fn mark_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (0u32..4, 0u32..8, 0u32..4000).prop_map(|(g, i, ms)| format!("{g}:{i}:{ms}")),
        1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(g, i, ms)| format!("{g}:{i}:{ms}")),
        1 => hostile_string(),
    ]
    .boxed()
}

fn dtmf_digit() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "#", "A", "B", "C", "D",
        ])
        .prop_map(str::to_owned),
        1 => hostile_string(),
    ]
    .boxed()
}

/// A message's top-level fields, mutated, as JSON text.
fn render(fields: BoxedStrategy<Vec<(String, String)>>) -> BoxedStrategy<String> {
    // Most messages keep their shape; a tenth lose, repeat, retype or gain fields.
    let mutations = prop_oneof![
        9 => Just(Vec::new()),
        1 => prop::collection::vec(field_mutation(), 1..4),
    ];
    (fields, mutations)
        .prop_map(|(mut fields, mutations)| {
            mutate_fields(&mut fields, &mutations);
            object(&fields)
        })
        .boxed()
}

/// `event`, `sequenceNumber` (usually) and `streamSid`, then `body` under `body_key`.
fn twilio_event(
    numbers: Numbers,
    event: &'static str,
    body_key: &'static str,
    body: BoxedStrategy<String>,
) -> BoxedStrategy<Vec<(String, String)>> {
    (maybe(decimal_field(numbers)), stream_sid(), body)
        .prop_map(move |(sequence, sid, body)| {
            let mut fields = vec![field("event", json_str(event))];
            if let Some(sequence) = sequence {
                fields.push(field("sequenceNumber", sequence));
            }
            fields.push(field("streamSid", sid));
            fields.push(field(body_key, body));
            fields
        })
        .boxed()
}

/// One Twilio Media Streams message: a real event's shape with each field drawn from real,
/// odd and hostile values, then top-level fields dropped, repeated, retyped or added.
pub fn twilio_message(numbers: Numbers) -> BoxedStrategy<String> {
    let connected = Just(vec![
        field("event", json_str("connected")),
        field("protocol", json_str("Call")),
        field("version", json_str("1.0.0")),
    ])
    .boxed();
    let mark = mark_name()
        .prop_map(|name| object(&[field("name", json_str(&name))]))
        .boxed();
    let dtmf = dtmf_digit()
        .prop_map(|digit| {
            object(&[
                field("track", json_str("inbound_track")),
                field("digit", json_str(&digit)),
            ])
        })
        .boxed();
    let stop = Just(object(&[
        field("accountSid", json_str("AC00000000000000000000000000000001")),
        field("callSid", json_str(CALL_SID)),
    ]))
    .boxed();
    let unknown = (
        prop_oneof![3 => Just("transcription".to_owned()), 1 => short_hostile_string()],
        any_json(),
    )
        .prop_map(|(event, value)| {
            vec![
                field("event", json_str(&event)),
                field("x", value.to_string()),
            ]
        })
        .boxed();
    let fields = prop_oneof![
        1 => connected,
        2 => twilio_event(numbers, "start", "start", start_body(numbers)),
        5 => twilio_event(numbers, "media", "media", media_body(numbers)),
        1 => twilio_event(numbers, "mark", "mark", mark),
        1 => twilio_event(numbers, "dtmf", "dtmf", dtmf),
        1 => twilio_event(numbers, "stop", "stop", stop),
        1 => unknown,
    ]
    .boxed();
    render(fields)
}

/// Characters that break JSON in interesting ways, for the text mutator.
const NOISE: &[char] = &[
    '"',
    '\\',
    '{',
    '}',
    '[',
    ']',
    ':',
    ',',
    '0',
    '9',
    '-',
    'e',
    ' ',
    '\u{0}',
    'é',
    '\u{10FFFF}',
];

#[derive(Clone, Debug)]
pub enum TextEdit {
    Replace(prop::sample::Index, prop::sample::Index),
    Insert(prop::sample::Index, prop::sample::Index),
    Remove(prop::sample::Index),
    Truncate(prop::sample::Index),
}

fn text_edit() -> BoxedStrategy<TextEdit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(at, c)| TextEdit::Replace(at, c)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(at, c)| TextEdit::Insert(at, c)),
        any::<prop::sample::Index>().prop_map(TextEdit::Remove),
        any::<prop::sample::Index>().prop_map(TextEdit::Truncate),
    ]
    .boxed()
}

/// `text` with a few character-level edits (always on character boundaries).
pub fn edit_text(text: &str, edits: &[TextEdit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for edit in edits {
        match edit {
            TextEdit::Replace(at, c) if !chars.is_empty() => {
                let at = at.index(chars.len());
                chars[at] = NOISE[c.index(NOISE.len())];
            }
            TextEdit::Insert(at, c) => {
                let at = at.index(chars.len() + 1);
                chars.insert(at, NOISE[c.index(NOISE.len())]);
            }
            TextEdit::Remove(at) if !chars.is_empty() => {
                chars.remove(at.index(chars.len()));
            }
            TextEdit::Truncate(at) => {
                let at = at.index(chars.len() + 1);
                chars.truncate(at);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// `base` (a strategy of valid-ish messages) with 1..4 character edits.
pub fn edited(base: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
    (base, prop::collection::vec(text_edit(), 1..4))
        .prop_map(|(text, edits)| edit_text(&text, &edits))
        .boxed()
}

/// Any text a Twilio socket could carry: grammar messages, edited fixture lines, verbatim
/// fixture lines and arbitrary strings.
pub fn twilio_text(numbers: Numbers) -> BoxedStrategy<String> {
    let fixture = prop::sample::select(fixture_lines(TWILIO_INBOUND)).prop_map(str::to_owned);
    prop_oneof![
        8 => twilio_message(numbers),
        2 => fixture.clone(),
        2 => edited(fixture),
        1 => edited(twilio_message(numbers)),
        1 => hostile_string(),
    ]
    .boxed()
}

/// A pool of ids so that generated model events refer to each other.
fn model_id(prefix: &'static str) -> BoxedStrategy<String> {
    prop_oneof![
        6 => (1u32..5).prop_map(move |n| format!("{prefix}_{n}")),
        1 => short_hostile_string(),
    ]
    .boxed()
}

fn u64_field() -> BoxedStrategy<String> {
    prop_oneof![
        6 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => prop::sample::select(vec!["-1", "1.5", "1e400", "null", "\"5\"", "18446744073709551616"])
            .prop_map(str::to_owned),
    ]
    .boxed()
}

/// `type`, `event_id` and the given fields.
fn model_fields(kind: &str, rest: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut fields = vec![
        field("type", json_str(kind)),
        field("event_id", json_str("event_1")),
    ];
    fields.extend(rest);
    fields
}

/// One OpenAI Realtime (GA) server event: the types the bridge reads, with fields drawn from
/// real, odd and hostile values, and unknown types; top-level fields then mutated.
pub fn model_event() -> BoxedStrategy<String> {
    let status = prop_oneof![
        4 => prop::sample::select(vec!["completed", "cancelled", "incomplete", "failed"])
            .prop_map(str::to_owned),
        1 => short_hostile_string(),
    ];
    let delta = (model_id("resp"), model_id("item"), payload(1000))
        .prop_map(|(response_id, item_id, delta)| {
            model_fields(
                "response.output_audio.delta",
                vec![
                    field("response_id", json_str(&response_id)),
                    field("item_id", json_str(&item_id)),
                    field("output_index", "0".to_owned()),
                    field("content_index", "0".to_owned()),
                    field("delta", json_str(&delta)),
                ],
            )
        })
        .boxed();
    let speech = (any::<bool>(), model_id("item"), u64_field())
        .prop_map(|(started, item_id, ms)| {
            let (kind, ms_key) = if started {
                ("input_audio_buffer.speech_started", "audio_start_ms")
            } else {
                ("input_audio_buffer.speech_stopped", "audio_end_ms")
            };
            model_fields(
                kind,
                vec![field(ms_key, ms), field("item_id", json_str(&item_id))],
            )
        })
        .boxed();
    let response = (any::<bool>(), model_id("resp"), status)
        .prop_map(|(created, id, status)| {
            let kind = if created {
                "response.created"
            } else {
                "response.done"
            };
            let body = object(&[
                field("id", json_str(&id)),
                field("status", json_str(&status)),
            ]);
            model_fields(kind, vec![field("response", body)])
        })
        .boxed();
    let transcript = (any::<bool>(), model_id("item"), hostile_string())
        .prop_map(|(input, item_id, text)| {
            let kind = if input {
                "conversation.item.input_audio_transcription.completed"
            } else {
                "response.output_audio_transcript.done"
            };
            model_fields(
                kind,
                vec![
                    field("item_id", json_str(&item_id)),
                    field("transcript", json_str(&text)),
                ],
            )
        })
        .boxed();
    let function = (
        model_id("call"),
        short_hostile_string(),
        short_hostile_string(),
    )
        .prop_map(|(call_id, name, arguments)| {
            model_fields(
                "response.function_call_arguments.done",
                vec![
                    field("call_id", json_str(&call_id)),
                    field("name", json_str(&name)),
                    field("arguments", json_str(&arguments)),
                ],
            )
        })
        .boxed();
    let error = (hostile_string(), maybe(short_hostile_string()))
        .prop_map(|(message, code)| {
            let mut error = vec![
                field("type", json_str("invalid_request_error")),
                field("message", json_str(&message)),
            ];
            if let Some(code) = code {
                error.push(field("code", json_str(&code)));
            }
            model_fields("error", vec![field("error", object(&error))])
        })
        .boxed();
    let other = (
        prop_oneof![
            3 => prop::sample::select(vec!["session.updated", "session.created", "rate_limits.updated"])
                .prop_map(str::to_owned),
            1 => short_hostile_string(),
        ],
        any_json(),
    )
        .prop_map(|(kind, value)| model_fields(&kind, vec![field("session", value.to_string())]))
        .boxed();
    let fields = prop_oneof![
        6 => delta,
        2 => speech,
        3 => response,
        2 => transcript,
        1 => function,
        1 => error,
        2 => other,
    ]
    .boxed();
    render(fields)
}

/// Any text the model's socket could carry.
pub fn model_text() -> BoxedStrategy<String> {
    let fixture = prop::sample::select(fixture_lines(OPENAI_SERVER_EVENTS)).prop_map(str::to_owned);
    prop_oneof![
        8 => model_event(),
        1 => fixture.clone(),
        1 => edited(fixture),
        1 => edited(model_event()),
        1 => hostile_string(),
    ]
    .boxed()
}

/// `depth` nested arrays (or objects) around a value: checks that no parser recurses without
/// a bound.
pub fn deeply_nested(depth: usize, objects: bool) -> String {
    let (open, close) = if objects {
        ("{\"a\":", "}")
    } else {
        ("[", "]")
    };
    let mut text = String::with_capacity(depth * (open.len() + close.len()) + 1);
    for _ in 0..depth {
        text.push_str(open);
    }
    text.push('1');
    for _ in 0..depth {
        text.push_str(close);
    }
    text
}
