//! Twilio request signatures (`twilio::signature`), the form bodies they cover, Twilio's id
//! shapes (`twilio::ids`) and the log-safe rendering of peer text (`logtext`).

use std::collections::BTreeMap;

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use voxrelay::Secret;
use voxrelay::logtext::{MAX_LOGGED_BYTES, Untrusted};
use voxrelay::twilio::ids;
use voxrelay::twilio::signature::{SignatureValidator, candidate_urls, compute_signature};

use crate::config;
use crate::grammar;

/// URLs as a proxy, Twilio or an attacker might spell them.
fn url() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["https", "http", "wss", "ws", "HTTPS", "ftp", ""]);
    let userinfo = prop_oneof![3 => Just(String::new()), 1 => "[a-z:]{1,8}@"];
    let host = prop_oneof![
        4 => "[a-z]{1,10}(\\.[a-z]{2,4}){0,2}",
        1 => Just("[::1]".to_owned()),
        1 => Just("127.0.0.1".to_owned()),
        1 => "[A-Z]{1,6}\\.COM",
        1 => grammar::short_hostile_string(),
    ];
    let port = prop_oneof![3 => Just(String::new()), 1 => (0u32..70_000).prop_map(|p| format!(":{p}")), 1 => Just(":".to_owned())];
    let rest = prop_oneof![
        3 => "(/[a-zA-Z0-9._~%'-]{0,8}){0,3}(\\?[a-zA-Z0-9=&%'+-]{0,20})?(#[a-z]{0,4})?",
        1 => grammar::short_hostile_string(),
    ];
    prop_oneof![
        6 => (scheme, userinfo, host, port, rest)
            .prop_map(|(s, u, h, p, r)| format!("{s}://{u}{h}{p}{r}")),
        1 => grammar::hostile_string(),
    ]
}

/// Form parameters with distinct keys (as Twilio sends them), values anything.
fn params() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::btree_map(
        prop_oneof![
            3 => prop::sample::select(vec![
                "CallSid", "AccountSid", "From", "To", "CallStatus", "Direction", "Caller",
                "Digits", "StreamSid", "StreamEvent",
            ])
            .prop_map(str::to_owned),
            1 => grammar::short_hostile_string(),
        ],
        grammar::short_hostile_string(),
        0..10,
    )
    .prop_map(|map: BTreeMap<String, String>| map.into_iter().collect())
}

fn form_body(params: &[(String, String)]) -> Vec<u8> {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
        .into_bytes()
}

/// The bridge's own reading of a webhook body (as the voice and status routes do).
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn hex_sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

proptest! {
    #![proptest_config(config(384))]

    /// The spellings tried for any URL: the URL as given first, no duplicates, and a small
    /// fixed bound (two bases, credentials kept or dropped, port added or removed, and the
    /// normalised form of each), so the work per request never grows with the input.
    #[test]
    fn candidate_urls_are_few_unique_and_start_with_the_url(url in url()) {
        let candidates = candidate_urls(&url);
        prop_assert_eq!(candidates.first().map(String::as_str), Some(url.as_str()));
        prop_assert!(candidates.len() <= 16, "{} candidates for {:?}", candidates.len(), url);
        let mut unique = candidates.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(unique.len(), candidates.len());
    }

    /// A webhook Twilio signed validates after the bridge parses its body; changing any one
    /// value, dropping a parameter, or moving to another URL fails; order does not matter.
    #[test]
    fn a_signed_form_validates_and_any_changed_value_fails(
        token in "[ -~]{1,40}",
        url in url(),
        params in params(),
        change in any::<prop::sample::Index>(),
        new_value in grammar::short_hostile_string(),
    ) {
        let validator = SignatureValidator::new(Secret::new(token.clone()));
        let signature = compute_signature(&token, &url, &params);
        let received = parse_form(&form_body(&params));
        prop_assert_eq!(&received, &params, "the form round-trips");
        prop_assert!(validator.validate_form(&url, &received, &signature));
        let mut reversed = received.clone();
        reversed.reverse();
        prop_assert!(validator.validate_form(&url, &reversed, &signature));

        if !params.is_empty() {
            let at = change.index(params.len());
            if params[at].1 != new_value {
                let mut changed = received.clone();
                changed[at].1 = new_value.clone();
                prop_assert!(
                    !validator.validate_form(&url, &changed, &signature),
                    "changed {:?} to {:?}", params[at], new_value
                );
            }
            // Keys and values are concatenated without separators, so dropping an empty pair
            // changes nothing that is signed.
            if !params[at].0.is_empty() || !params[at].1.is_empty() {
                let mut dropped = received.clone();
                dropped.remove(at);
                prop_assert!(!validator.validate_form(&url, &dropped, &signature));
            }
        }
        let other_url = format!("{url}x");
        if !candidate_urls(&other_url).contains(&url) {
            prop_assert!(!validator.validate_form(&other_url, &received, &signature));
        }
        prop_assert!(!validator.validate_form(&url, &received, ""));
    }

    /// A JSON webhook validates only with its own body (pinned by `bodySHA256`).
    #[test]
    fn a_signed_json_body_validates_and_any_other_body_fails(
        token in "[ -~]{1,40}",
        base in "https://[a-z]{1,10}\\.com/[a-z]{0,8}",
        body in prop::collection::vec(any::<u8>(), 0..200),
        other in prop::collection::vec(any::<u8>(), 0..200),
        upper in any::<bool>(),
    ) {
        let validator = SignatureValidator::new(Secret::new(token.clone()));
        let hash = hex_sha256(&body);
        let hash = if upper { hash.to_uppercase() } else { hash };
        let url = format!("{base}?bodySHA256={hash}");
        let signature = compute_signature(&token, &url, &[]);
        prop_assert!(validator.validate_json(&url, &body, &signature));
        if other != body {
            prop_assert!(!validator.validate_json(&url, &other, &signature));
        }
        prop_assert!(!validator.validate_json(&base, &body, &compute_signature(&token, &base, &[])));
    }

    /// A stream handshake validates for its `wss://` URL (also when a proxy reports it as
    /// `https://`), and not for another path.
    #[test]
    fn a_signed_websocket_url_validates_and_other_paths_fail(
        token in "[ -~]{1,40}",
        host in "[a-z]{1,10}\\.com",
        path in "(/[a-z]{1,8}){1,3}",
    ) {
        let validator = SignatureValidator::new(Secret::new(token.clone()));
        let wss = format!("wss://{host}{path}");
        let signature = compute_signature(&token, &wss, &[]);
        prop_assert!(validator.validate_websocket(&wss, &signature));
        let https = format!("https://{host}{path}");
        let other_path = format!("wss://{host}{path}x");
        prop_assert!(validator.validate_websocket(&https, &signature));
        prop_assert!(!validator.validate_websocket(&other_path, &signature));
        prop_assert!(!validator.validate_websocket(&wss, ""));
    }

    /// Any URL, any form body bytes, any signature header: no validator panics, and a
    /// signature that was not computed with the token does not validate.
    #[test]
    fn validators_never_panic_on_any_input(
        url in url(),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            "[a-zA-Z0-9=&%+._-]{0,120}".prop_map(String::into_bytes),
        ],
        signature in prop_oneof![grammar::short_hostile_string(), "[A-Za-z0-9+/]{27}="],
    ) {
        let validator = SignatureValidator::new(Secret::new("token"));
        let params = parse_form(&body);
        // A 160-bit MAC is not guessed by a generator.
        prop_assert!(!validator.validate_form(&url, &params, &signature));
        let _ = validator.validate_json(&url, &body, &signature);
        let _ = validator.validate_websocket(&url, &signature);
    }

    /// `is_sid` accepts exactly the prefix and 32 hex digits; a re-split of `CallSid` with the
    /// next parameter (Twilio's signature cannot tell them apart) is never a call SID.
    #[test]
    fn sid_checks_accept_exactly_prefix_and_32_hex_digits(
        value in prop_oneof![grammar::hostile_string(), "(CA|AC|MZ|ca)[0-9a-fA-Fg]{30,34}"],
        hex in "[0-9a-f]{32}",
        key in "[A-Za-z]{1,12}",
        next in "[ -~]{0,12}",
    ) {
        let expected = |prefix: &str| {
            value.len() == 34
                && value.starts_with(prefix)
                && value[2..].bytes().all(|b| b.is_ascii_hexdigit())
        };
        prop_assert_eq!(ids::is_call_sid(&value), expected("CA"));
        prop_assert_eq!(ids::is_account_sid(&value), expected("AC"));
        prop_assert_eq!(ids::is_stream_sid(&value), expected("MZ"));
        let call_sid = format!("CA{hex}");
        prop_assert!(ids::is_call_sid(&call_sid));
        let resplit = format!("{call_sid}{key}{next}");
        prop_assert!(!ids::is_call_sid(&resplit));
    }

    /// Peer text in a log line: never a control character or line separator (so it cannot
    /// forge a line), cut to a bounded size, and unchanged when it is short and plain.
    #[test]
    fn untrusted_text_is_escaped_and_cut(text in grammar::hostile_string()) {
        let shown = Untrusted(&text).to_string();
        prop_assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "{:?}", shown
        );
        // `\u{10ffff}` is the longest escape (10 bytes per char); plus the cut marker.
        prop_assert!(shown.len() <= MAX_LOGGED_BYTES * 10 + 32, "{} bytes", shown.len());
        let plain = !text.chars().any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}');
        if plain && text.len() <= MAX_LOGGED_BYTES {
            prop_assert_eq!(shown, text);
        }
    }
}

/// Found by `validators_never_panic_on_any_input`: a URL whose 7th or 8th byte falls inside a
/// multi-byte character made the scheme check slice through it and panic.
#[test]
fn a_multibyte_character_at_the_scheme_boundary_does_not_panic() {
    let validator = SignatureValidator::new(Secret::new("token"));
    for url in ["://a𐀀", "https:/é", "http:/é/x", "wss://é"] {
        assert!(!validator.validate_websocket(url, "c2lnbmF0dXJl"));
    }
}
