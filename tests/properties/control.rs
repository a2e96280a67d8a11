//! The control-plane API: request signing (`control::signing`) and the `/v1` JSON types and
//! paths (`control::api`).

use proptest::prelude::*;
use voxrelay::Secret;
use voxrelay::control::api::{
    CallHistory, CallReport, ErrorBody, ReportAck, TenantContext, ToolRequest, ToolResponse,
    context_path_and_query, memory_namespace, report_path, tool_path,
};
use voxrelay::control::signing::{
    Rejection, Scope, SignedHeaders, SigningKey, Verifier, canonical_string, sign,
};

use crate::config;
use crate::grammar;

const NOW: u64 = 1_750_000_000;

fn keys() -> Vec<SigningKey> {
    vec![
        SigningKey::new("cp-1", Secret::new("first secret")),
        SigningKey::new("cp-2", Secret::new("second: secret")),
    ]
}

/// A key the verifier does not have.
fn stranger() -> SigningKey {
    SigningKey::new("cp-x", Secret::new("not shared"))
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["GET", "POST", "get", "PUT"]).prop_map(str::to_owned),
        1 => grammar::short_hostile_string(),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "/v1/(context|calls|tools)(/[a-zA-Z0-9%]{1,12}){0,2}(\\?[a-z_]{1,8}=[a-zA-Z0-9%+]{0,12}){0,1}",
        1 => grammar::short_hostile_string(),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..200),
        1 => grammar::hostile_string().prop_map(String::into_bytes),
    ]
}

/// Header values as received: mostly the right shape, often slightly off, sometimes anything.
fn header_value(shape: &'static str) -> BoxedStrategy<String> {
    let hostile = grammar::short_hostile_string();
    match shape {
        "timestamp" => prop_oneof![
            3 => (NOW - 400..NOW + 400).prop_map(|t| t.to_string()),
            1 => any::<u64>().prop_map(|t| t.to_string()),
            1 => prop::sample::select(vec!["", "0", "01750000000", "-1", "+1750000000", "1750000000.0", "18446744073709551616", "99999999999999999999999"]).prop_map(str::to_owned),
            1 => hostile,
        ]
        .boxed(),
        "nonce" => prop_oneof![3 => "[0-9a-f]{32}", 1 => "[0-9a-fA-F]{30,34}", 1 => hostile].boxed(),
        "key_id" => prop_oneof![
            3 => prop::sample::select(vec!["cp-1", "cp-2", "cp-x", "", "cp-1 ", "cp:1"]).prop_map(str::to_owned),
            1 => "[!-~]{120,140}",
            1 => hostile,
        ]
        .boxed(),
        _ => prop_oneof![
            3 => "v1=[0-9a-f]{64}",
            1 => "(v1=|v2=|V1=|)[0-9a-fA-F]{62,66}",
            1 => hostile,
        ]
        .boxed(),
    }
}

fn any_headers() -> impl Strategy<Value = SignedHeaders> {
    (
        header_value("timestamp"),
        header_value("nonce"),
        header_value("key_id"),
        header_value("signature"),
    )
        .prop_map(|(timestamp, nonce, key_id, signature)| SignedHeaders {
            timestamp,
            nonce,
            key_id,
            signature,
        })
}

/// One thing that can happen to a verifier.
#[derive(Clone, Debug)]
enum Op {
    /// A request signed now (± skew) with a nonce from a small pool (so nonces repeat).
    Signed {
        stranger: bool,
        skew: i64,
        nonce: u8,
        method: String,
        path: String,
        body: Vec<u8>,
    },
    /// An earlier request sent again, byte for byte.
    Replay(prop::sample::Index),
    /// Headers from nowhere.
    Garbage(SignedHeaders, String, String, Vec<u8>),
    /// The verifier's clock moves (either way).
    Clock(i64),
    RefuseBefore(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::bool::weighted(0.1), -400i64..400, 0u8..12, method(), path(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(stranger, skew, nonce, method, path, body)| Op::Signed {
                stranger, skew, nonce, method, path, body,
            }
        ),
        3 => any::<prop::sample::Index>().prop_map(Op::Replay),
        2 => (any_headers(), method(), path(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(h, m, p, b)| Op::Garbage(h, m, p, b)),
        2 => prop_oneof![-700i64..700, Just(i64::from(u32::MAX))].prop_map(Op::Clock),
        1 => (-400i64..400).prop_map(Op::RefuseBefore),
    ]
}

#[derive(Clone, Debug)]
struct Request {
    headers: SignedHeaders,
    method: String,
    path: String,
    body: Vec<u8>,
}

fn offset(base: u64, by: i64) -> u64 {
    base.saturating_add_signed(by)
}

proptest! {
    #![proptest_config(config(256))]

    /// The canonical string is the four fields and the body's hash, one per line; for fields
    /// without line breaks (the verifier refuses any other) two different requests never
    /// share one.
    #[test]
    fn canonical_strings_are_structured_and_distinct(
        a in ("[0-9]{1,12}", "[0-9a-f]{32}", method(), path(), body()),
        b in ("[0-9]{1,12}", "[0-9a-f]{32}", method(), path(), body()),
    ) {
        let one = canonical_string(&a.0, &a.1, &a.2, &a.3, &a.4);
        let lines: Vec<&str> = one.split('\n').collect();
        let single_line = |field: &str| !field.contains(['\n', '\r']);
        if single_line(&a.2) && single_line(&a.3) {
            prop_assert_eq!(lines.len(), 5);
            prop_assert_eq!(&lines[..4], &[a.0.as_str(), a.1.as_str(), a.2.as_str(), a.3.as_str()][..]);
            prop_assert_eq!(lines[4].len(), 64);
            prop_assert!(lines[4].bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
            if single_line(&b.2) && single_line(&b.3) && a != b {
                prop_assert_ne!(one, canonical_string(&b.0, &b.1, &b.2, &b.3, &b.4));
            }
        }
    }

    /// A request signed with a shared key verifies once; sent again it is a replay; changing
    /// any header, the method, the target or the body makes it fail.
    #[test]
    fn a_signed_request_verifies_once_and_any_change_fails(
        key in 0usize..2,
        nonce in any::<[u8; 16]>(),
        skew in -300i64..=300,
        method in "[A-Z]{3,6}",
        path in path().prop_filter("single line", |p| !p.contains(['\n', '\r'])),
        body in body(),
        tamper in 0usize..8,
        flip in any::<prop::sample::Index>(),
    ) {
        let keys = keys();
        let mut verifier = Verifier::new(keys.clone());
        let timestamp = offset(NOW, skew);
        let headers = sign(&keys[key], timestamp, nonce, &method, &path, &body);

        let mut changed = (headers.clone(), method.clone(), path.clone(), body.clone());
        let flip_hex = |text: &mut String| {
            let at = flip.index(text.len());
            let mut bytes = text.clone().into_bytes();
            bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
            *text = String::from_utf8(bytes).expect("ascii");
        };
        match tamper {
            0 => changed.0.timestamp = (timestamp + 1).to_string(),
            1 => flip_hex(&mut changed.0.nonce),
            2 => changed.0.key_id = if key == 0 { "cp-2" } else { "cp-1" }.to_owned(),
            3 => {
                let mut signature = changed.0.signature.split_off(3);
                flip_hex(&mut signature);
                changed.0.signature.push_str(&signature);
            }
            4 => changed.1.push('X'),
            5 => changed.2.push('/'),
            6 => changed.3.push(b'\n'),
            _ => changed.3 = changed.3.iter().rev().copied().collect::<Vec<u8>>(),
        }
        let unchanged = changed == (headers.clone(), method.clone(), path.clone(), body.clone());
        if !unchanged {
            let len = verifier.nonce_cache_len();
            prop_assert!(verifier.verify(NOW, &changed.0, &changed.1, &changed.2, &changed.3).is_err());
            prop_assert_eq!(verifier.nonce_cache_len(), len, "a refused request records nothing");
        }
        prop_assert!(verifier.verify(NOW, &headers, &method, &path, &body).is_ok());
        prop_assert_eq!(verifier.nonce_cache_len(), 1);
        prop_assert_eq!(
            verifier.verify(NOW, &headers, &method, &path, &body).err(),
            Some(Rejection::Replayed)
        );
    }

    /// Any sequence of signed requests, replays, garbage headers and clock steps (backwards
    /// too), with a tiny nonce cache: nothing panics, the cache never holds more than its
    /// capacity, a refused request never adds to it, and a request accepted once is never
    /// accepted again, whatever was evicted or expired in between.
    #[test]
    fn the_nonce_cache_stays_within_its_cap_and_replays_never_pass(
        capacity in 1usize..6,
        ops in prop::collection::vec(op(), 1..64),
    ) {
        let keys = keys();
        let mut verifier = Verifier::with_nonce_capacity(
            keys.iter().map(|key| (key.clone(), Scope::Bridge)).collect(),
            capacity,
        );
        let mut now = NOW;
        let mut sent: Vec<Request> = Vec::new();
        let mut accepted: Vec<Request> = Vec::new();
        for op in ops {
            let request = match op {
                Op::Clock(by) => {
                    now = offset(now, by);
                    continue;
                }
                Op::RefuseBefore(by) => {
                    verifier.refuse_before(offset(now, by));
                    continue;
                }
                Op::Signed { stranger: is_stranger, skew, nonce, method, path, body } => {
                    let key = if is_stranger { stranger() } else { keys[usize::from(nonce) % 2].clone() };
                    let headers = sign(&key, offset(now, skew), [nonce; 16], &method, &path, &body);
                    Request { headers, method, path, body }
                }
                Op::Replay(index) if !sent.is_empty() => sent[index.index(sent.len())].clone(),
                Op::Replay(_) => continue,
                Op::Garbage(headers, method, path, body) => Request { headers, method, path, body },
            };
            let len_before = verifier.nonce_cache_len();
            let result = verifier.verify(now, &request.headers, &request.method, &request.path, &request.body);
            let len_after = verifier.nonce_cache_len();
            prop_assert!(len_after <= capacity, "{} nonces cached, capacity {}", len_after, capacity);
            if result.is_ok() {
                prop_assert!(
                    !accepted.iter().any(|earlier| earlier.headers == request.headers
                        && earlier.method == request.method
                        && earlier.path == request.path
                        && earlier.body == request.body),
                    "a replay passed: {:?}", request
                );
                accepted.push(request.clone());
            } else {
                prop_assert!(len_after <= len_before, "a refused request was remembered");
            }
            sent.push(request);
        }
    }

    /// Any header values, method, target and body: verification never panics and never
    /// accepts (no generator guesses a 256-bit MAC), and nothing is remembered.
    #[test]
    fn arbitrary_headers_are_refused_without_panicking(
        headers in any_headers(),
        method in method(),
        path in path(),
        body in body(),
        now in prop_oneof![Just(NOW), any::<u64>()],
    ) {
        let mut verifier = Verifier::new(keys());
        prop_assert!(verifier.verify(now, &headers, &method, &path, &body).is_err());
        prop_assert_eq!(verifier.nonce_cache_len(), 0);
        let lookup = |name: &str| match name {
            "x-voxrelay-timestamp" => Some(headers.timestamp.as_str()),
            "x-voxrelay-nonce" => Some(headers.nonce.as_str()),
            "x-voxrelay-key-id" => Some(headers.key_id.as_str()),
            "x-voxrelay-signature" => Some(headers.signature.as_str()),
            _ => None,
        };
        prop_assert_eq!(SignedHeaders::from_headers(lookup).ok(), Some(headers.clone()));
        prop_assert_eq!(SignedHeaders::from_headers(|_| None).err(), Some(Rejection::Malformed));
    }

    /// A key list is parsed or refused without panicking, and a refusal never echoes a
    /// secret.
    #[test]
    fn key_lists_never_panic_and_errors_never_echo_a_secret(
        entries in prop::collection::vec(
            ("[!-~]{0,8}", prop::sample::select(vec![":", "", "::", " : "]), "[A-Z0-9]{8,16}"),
            0..5,
        ),
        separator in prop::sample::select(vec![",", ", ", ",,", ";"]),
        hostile in grammar::hostile_string(),
    ) {
        let list = entries
            .iter()
            .map(|(id, colon, secret)| format!("{id}{colon}{secret}"))
            .collect::<Vec<_>>()
            .join(separator);
        if let Err(error) = Verifier::from_key_list(&list) {
            let message = error.to_string();
            for (_, _, secret) in &entries {
                prop_assert!(!message.contains(secret.as_str()), "{:?} echoes {:?}", message, secret);
            }
        }
        let _ = Verifier::from_key_list(&hostile);
    }

    /// Any JSON (and any text) given as a `/v1` document: parsing never panics; what parses
    /// survives a serialise/parse round trip unchanged.
    #[test]
    fn api_documents_never_panic_and_round_trip(
        text in prop_oneof![
            3 => grammar::any_json().prop_map(|value| value.to_string()),
            3 => report_json(),
            1 => grammar::edited(report_json()),
            1 => grammar::hostile_string(),
        ],
    ) {
        fn check<T>(text: &str) -> Result<(), TestCaseError>
        where
            T: serde::de::DeserializeOwned + serde::Serialize,
        {
            if let Ok(value) = serde_json::from_str::<T>(text) {
                let first = serde_json::to_value(&value).expect("serialises");
                let again: T = serde_json::from_str(&first.to_string())
                    .expect("our own output parses");
                let second = serde_json::to_value(&again).expect("serialises");
                prop_assert!(same_json(&first, &second), "{} became {}", first, second);
            }
            Ok(())
        }
        check::<TenantContext>(&text)?;
        check::<ToolRequest>(&text)?;
        check::<ToolResponse>(&text)?;
        check::<CallReport>(&text)?;
        check::<ReportAck>(&text)?;
        check::<CallHistory>(&text)?;
        check::<ErrorBody>(&text)?;
    }

    /// Paths built from caller-controlled text stay on their route: a segment is escaped so
    /// it cannot add `/`, `?` or `#`, and decodes back to the text; a query decodes back to
    /// exactly its three values; a memory namespace never leaves its tenant's prefix.
    #[test]
    fn paths_and_namespaces_built_from_peer_text_stay_in_place(
        segment in grammar::hostile_string(),
        to in grammar::short_hostile_string(),
        from in grammar::short_hostile_string(),
        tenant in "[a-z0-9_]{1,12}",
    ) {
        let path = report_path(&segment);
        let encoded = path
            .strip_prefix("/v1/calls/")
            .and_then(|rest| rest.strip_suffix("/report"))
            .expect("route shape");
        prop_assert!(!encoded.contains(['/', '?', '#']));
        prop_assert_eq!(percent_decode(encoded), segment.clone().into_bytes());
        let tool = tool_path(&segment);
        prop_assert!(!tool["/v1/tools/".len()..].contains(['/', '?', '#']));

        let query = context_path_and_query(&to, &from, &segment);
        let (route, query) = query.split_once('?').expect("has a query");
        prop_assert_eq!(route, "/v1/context");
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        prop_assert_eq!(pairs, vec![
            ("to".to_owned(), to.clone()),
            ("from".to_owned(), from.clone()),
            ("call_sid".to_owned(), segment.clone()),
        ]);

        let namespace = memory_namespace(&tenant, &from);
        let caller = namespace.strip_prefix(&format!("{tenant}/")).expect("tenant prefix");
        prop_assert!(!caller.is_empty());
        prop_assert!(caller.chars().all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c)));
    }
}

/// Equal JSON, with numbers compared to within a rounding error: serde_json (without its
/// `float_roundtrip` feature) may read a float back one unit in the last place off.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, x)| y.get(key).is_some_and(|y| same_json(x, y)))
        }
        _ => a == b,
    }
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    out
}

/// A report as the bridge sends it, with hostile strings and numbers at the edges.
fn report_json() -> impl Strategy<Value = String> {
    (
        grammar::short_hostile_string(),
        prop::option::of(grammar::short_hostile_string()),
        prop::sample::select(vec!["bound", "unbound", "bound", "unbound", "robot"]),
        any::<u64>(),
        (0u32..100_000).prop_map(|n| f64::from(n) / 8.0),
        prop::collection::vec(
            (
                prop::sample::select(vec!["caller", "assistant", "caller", "assistant", "robot"]),
                any::<u64>(),
                grammar::hostile_string(),
            ),
            0..4,
        ),
    )
        .prop_map(|(text, tenant, binding, number, seconds, transcript)| {
            let transcript: Vec<serde_json::Value> = transcript
                .into_iter()
                .map(|(speaker, offset_ms, text)| {
                    serde_json::json!({"speaker": speaker, "offset_ms": offset_ms, "text": text})
                })
                .collect();
            let latency = serde_json::json!({"count": number, "p50": 1, "p99": 2, "max": 3});
            let report = serde_json::json!({
                "call_sid": text, "stream_sid": text, "tenant_id": tenant,
                "agent_name": text, "from": text, "to": text,
                "started_at_ms": number, "ended_at_ms": number,
                "end_reason": "twilio_stop", "context_source": "fresh", "binding": binding,
                "memory_namespace": tenant,
                "audio_seconds_in": seconds, "audio_seconds_out": seconds,
                "barge_ins": number, "dtmf_digits": 0, "tool_calls": 0,
                "latency": {"uplink_us": latency, "downlink_us": latency, "barge_in_us": latency},
                "transcript": transcript,
            });
            report.to_string()
        })
}

/// The report generator produces documents the type accepts, so the round-trip property is
/// not vacuous for reports.
#[test]
fn the_report_generator_produces_valid_reports() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut parsed = 0;
    for _ in 0..64 {
        let text = report_json()
            .new_tree(&mut runner)
            .expect("generates")
            .current();
        if serde_json::from_str::<CallReport>(&text).is_ok() {
            parsed += 1;
        }
    }
    assert!(parsed >= 16, "only {parsed} of 64 generated reports parsed");
}
