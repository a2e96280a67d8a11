//! Twilio request signatures and the webhook form bodies they cover. The input is a URL line,
//! a signature line, then the body (form-encoded, or anything). Checks: nothing panics;
//! `candidate_urls` returns the URL first, no duplicates, at most 16 spellings; the body as
//! the bridge parses it, signed the way Twilio signs, validates (in any order) and fails once
//! any signed value changes; a JSON body validates only with its own `bodySHA256`; the
//! `wss://` URL signed validates as a handshake; SID checks accept exactly prefix + 32 hex
//! digits; peer text for a log line carries no control character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxrelay::Secret;
use voxrelay::logtext::Untrusted;
use voxrelay::twilio::ids;
use voxrelay::twilio::signature::{
    SignatureValidator, body_matches_sha256, candidate_urls, compute_signature,
};

const TOKEN: &str = "fuzz auth token";

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&byte| byte == b'\n');
    let url = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let signature = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let body = parts.next().unwrap_or_default();
    let validator = SignatureValidator::new(Secret::new(TOKEN));

    let candidates = candidate_urls(&url);
    assert_eq!(candidates.first(), Some(&url));
    assert!(candidates.len() <= 16, "{} candidates", candidates.len());
    for (index, candidate) in candidates.iter().enumerate() {
        assert!(!candidates[..index].contains(candidate));
    }

    let params: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let _ = validator.validate_form(&url, &params, &signature);
    let _ = validator.validate_json(&url, body, &signature);
    let _ = validator.validate_websocket(&url, &signature);
    let _ = body_matches_sha256(body, &signature);

    let signed = compute_signature(TOKEN, &url, &params);
    assert!(validator.validate_form(&url, &params, &signed));
    let mut reversed = params.clone();
    reversed.reverse();
    assert!(validator.validate_form(&url, &reversed, &signed));
    if let Some((key, value)) = params.first() {
        // Only when the key is unique: with repeated keys another split can sign the same.
        if params.iter().filter(|(other, _)| other == key).count() == 1 {
            let mut changed = params.clone();
            changed[0].1 = format!("{value}x");
            assert!(!validator.validate_form(&url, &changed, &signed));
        }
    }

    let json_url = format!("https://fuzz.example/hook?bodySHA256={}", sha256_hex(body));
    let json_signature = compute_signature(TOKEN, &json_url, &[]);
    assert!(validator.validate_json(&json_url, body, &json_signature));
    let mut other_body = body.to_vec();
    other_body.push(b'x');
    assert!(!validator.validate_json(&json_url, &other_body, &json_signature));

    if let Some(rest) = url.strip_prefix("wss://") {
        assert!(validator.validate_websocket(&url, &signed_websocket(&url)));
        let https = format!("https://{rest}");
        assert!(validator.validate_websocket(&https, &signed_websocket(&url)));
    }

    for (key, value) in &params {
        for (prefix, check) in [
            ("CA", ids::is_call_sid as fn(&str) -> bool),
            ("AC", ids::is_account_sid),
            ("MZ", ids::is_stream_sid),
        ] {
            let expected = value.len() == 34
                && value.starts_with(prefix)
                && value.as_bytes()[2..].iter().all(u8::is_ascii_hexdigit);
            assert_eq!(check(value), expected);
        }
        let shown = Untrusted(key).to_string();
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
    }
});

fn signed_websocket(url: &str) -> String {
    compute_signature(TOKEN, url, &[])
}

fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body))
}
