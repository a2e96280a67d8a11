//! Request signatures for the control-plane API (`X-Voxrelay-*` headers, scheme `v1`).
//!
//! Owns both sides of the scheme: [`sign`] produces the four headers for a request, and
//! [`Verifier`] checks them. The MAC is `HMAC-SHA256(secret, timestamp \n nonce \n METHOD \n
//! path-and-query \n hex SHA-256(body))` ([`canonical_string`]), sent as `v1=<64 lowercase hex>`.
//! Invariants: secrets live only inside [`Secret`]; the received signature is compared in
//! constant time; checks run in a fixed order (shape, key id, clock window, signature, replay)
//! so a [`Rejection`] never tells an unauthenticated sender more than "no"; only a request whose
//! signature is valid records its nonce, so nobody without a key can fill or poison the nonce
//! cache; the cache is bounded and never forgets a nonce without also refusing its timestamp
//! (see [`Verifier`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Secret, lowerhex};

type HmacSha256 = Hmac<Sha256>;

pub const HEADER_TIMESTAMP: &str = "x-voxrelay-timestamp";
pub const HEADER_NONCE: &str = "x-voxrelay-nonce";
pub const HEADER_KEY_ID: &str = "x-voxrelay-key-id";
pub const HEADER_SIGNATURE: &str = "x-voxrelay-signature";

/// How far a request's timestamp may be from the verifier's clock, either way.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// Default bound on remembered nonces. A nonce is kept for up to [`MAX_CLOCK_SKEW_SECS`] past
/// its timestamp, so this covers about 430 signed requests per second sustained before the
/// eviction policy of [`Verifier`] starts refusing the oldest timestamps; at roughly 80 bytes
/// per entry it costs at most ~10 MiB.
pub const DEFAULT_NONCE_CAPACITY: usize = 1 << 17;

/// The prefix of the signature header value that names the scheme version.
const SIGNATURE_PREFIX: &str = "v1=";
const NONCE_HEX_LEN: usize = 32;
const SIGNATURE_HEX_LEN: usize = 64;
/// Longest key id accepted in a header or a key list; ids are labels, not data.
const MAX_KEY_ID_LEN: usize = 128;
/// `u64::MAX` has 20 decimal digits.
const MAX_TIMESTAMP_DIGITS: usize = 20;

/// What a key may do on the control plane. Scopes do not overlap: a bridge's key cannot read
/// call history (every tenant's transcripts), an operator's cannot act as a bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `GET /v1/context`, `POST /v1/calls/{call_sid}/report`, `POST /v1/tools/{name}`: what a
    /// bridge needs. The default of a key list entry without a scope.
    #[default]
    Bridge,
    /// `GET /v1/calls`: call history with transcripts, for operators' tools.
    Operator,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Bridge => "bridge",
            Scope::Operator => "operator",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "bridge" => Some(Scope::Bridge),
            "operator" => Some(Scope::Operator),
            _ => None,
        }
    }
}

/// One shared signing key. Its `Debug` never shows the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub id: String,
    pub secret: Secret,
}

impl SigningKey {
    pub fn new(id: impl Into<String>, secret: Secret) -> Self {
        Self {
            id: id.into(),
            secret,
        }
    }
}

/// The four signature header values of one request, as sent or as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub key_id: String,
    pub signature: String,
}

impl SignedHeaders {
    /// Reads the four headers through `get` (header name, lowercase, to value); a missing one
    /// is [`Rejection::Malformed`]. Values are taken verbatim: [`Verifier::verify`] checks them.
    pub fn from_headers<'a>(
        mut get: impl FnMut(&str) -> Option<&'a str>,
    ) -> Result<Self, Rejection> {
        let mut field = |name: &str| get(name).map(str::to_owned).ok_or(Rejection::Malformed);
        Ok(Self {
            timestamp: field(HEADER_TIMESTAMP)?,
            nonce: field(HEADER_NONCE)?,
            key_id: field(HEADER_KEY_ID)?,
            signature: field(HEADER_SIGNATURE)?,
        })
    }

    /// `(header name, value)` pairs to put on an outgoing request.
    pub fn pairs(&self) -> [(&'static str, &str); 4] {
        [
            (HEADER_TIMESTAMP, &self.timestamp),
            (HEADER_NONCE, &self.nonce),
            (HEADER_KEY_ID, &self.key_id),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }
}

/// Why a request was refused. The HTTP layer answers 401 with [`Rejection::as_str`] and
/// nothing else: no variant says which key, which byte or which bound was involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A header is missing or not in its exact format.
    #[error("malformed")]
    Malformed,
    /// The timestamp is outside the window around the verifier's clock, or older than the
    /// oldest nonce the verifier can still vouch for.
    #[error("stale")]
    Stale,
    /// A valid signature whose nonce was already accepted within the window.
    #[error("replayed")]
    Replayed,
    #[error("unknown_key")]
    UnknownKey,
    #[error("bad_signature")]
    BadSignature,
}

impl Rejection {
    /// The reason code sent to the client.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Stale => "stale",
            Self::Replayed => "replayed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
        }
    }
}

/// Why `VOXRELAY_CONTROL_PLANE_KEYS` could not be read. Entries are named by their 1-based
/// position, never by content, so the error cannot echo a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyListError {
    #[error("the key list is empty: expected `key_id:secret[:scope][,key_id:secret[:scope]]`")]
    Empty,
    #[error("key list entry {entry} is empty (stray comma?)")]
    EmptyEntry { entry: usize },
    #[error("key list entry {entry} has no `:` between key id and secret")]
    MissingSeparator { entry: usize },
    #[error("key list entry {entry} has an empty key id")]
    EmptyId { entry: usize },
    #[error(
        "key list entry {entry} has an invalid key id (visible ASCII only, at most {MAX_KEY_ID_LEN} characters)"
    )]
    InvalidId { entry: usize },
    #[error("key list entry {entry} has an empty secret")]
    EmptySecret { entry: usize },
    #[error("key list entry {entry} repeats the key id of an earlier entry")]
    DuplicateId { entry: usize },
}

/// The exact string that is MACed.
///
/// Fields are used verbatim: the method as sent (HTTP methods are case-sensitive, so `GET` is
/// not `get`), the request target exactly as on the request line (no decoding or
/// normalisation of percent-escapes or query order).
pub fn canonical_string(
    timestamp: &str,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> String {
    let mut out = String::with_capacity(
        timestamp.len() + nonce.len() + method.len() + path_and_query.len() + 64 + 4,
    );
    for field in [timestamp, nonce, method, path_and_query] {
        out.push_str(field);
        out.push('\n');
    }
    lowerhex::push(&mut out, &Sha256::digest(body));
    out
}

/// Signs a request: `nonce` must come from a CSPRNG (e.g. `rand::random()`), `unix_now` from
/// the wall clock.
pub fn sign(
    key: &SigningKey,
    unix_now: u64,
    nonce: [u8; 16],
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> SignedHeaders {
    let timestamp = unix_now.to_string();
    let mut nonce_hex = String::with_capacity(NONCE_HEX_LEN);
    lowerhex::push(&mut nonce_hex, &nonce);
    let mac = mac_over(
        &key.secret,
        &timestamp,
        &nonce_hex,
        method,
        path_and_query,
        body,
    );
    let mut signature = String::with_capacity(SIGNATURE_PREFIX.len() + SIGNATURE_HEX_LEN);
    signature.push_str(SIGNATURE_PREFIX);
    lowerhex::push(&mut signature, &mac);
    SignedHeaders {
        timestamp,
        nonce: nonce_hex,
        key_id: key.id.clone(),
        signature,
    }
}

/// Checks signed requests against a set of keys and remembers accepted nonces.
///
/// Nonce cache policy: an accepted nonce is kept until its timestamp leaves the window
/// (`timestamp + MAX_CLOCK_SKEW_SECS < unix_now`), so a replay is caught for as long as its
/// timestamp could pass the clock check. The cache holds at most `capacity` nonces; when a new
/// valid request would exceed it, the entry with the oldest timestamp is evicted and `floor` is
/// raised to that timestamp, and from then on any request with a timestamp at or below the
/// floor is [`Rejection::Stale`]. Forgetting a nonce therefore always comes with refusing every
/// request that could replay it: overload costs availability for the oldest timestamps, never
/// replay protection. Only holders of a key can add entries, so the bound is about honest load,
/// not an attack surface. Expiry also raises the floor, so a verifier clock stepped back by more
/// than the window refuses requests until it catches up, rather than reopening forgotten ones.
pub struct Verifier {
    keys: HashMap<String, (Secret, Scope)>,
    /// Accepted nonce to its request timestamp.
    nonces: HashMap<[u8; 16], u64>,
    /// The same entries ordered by timestamp, for expiry and eviction.
    by_timestamp: BTreeSet<(u64, [u8; 16])>,
    capacity: usize,
    /// Requests with a timestamp at or below this are refused: their nonces may be forgotten.
    floor: Option<u64>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut key_ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        key_ids.sort_unstable();
        f.debug_struct("Verifier")
            .field("key_ids", &key_ids)
            .field("nonces", &self.nonces.len())
            .field("capacity", &self.capacity)
            .field("floor", &self.floor)
            .finish()
    }
}

impl Verifier {
    /// A verifier for `keys`, all of [`Scope::Bridge`], any of which may sign (two at once
    /// during a rotation). A key with an empty secret is dropped, since it would let anyone
    /// sign; of two keys with the same id the later wins.
    pub fn new(keys: Vec<SigningKey>) -> Self {
        Self::with_scopes(keys.into_iter().map(|key| (key, Scope::Bridge)).collect())
    }

    /// As [`Verifier::new`], each key with its scope.
    pub fn with_scopes(keys: Vec<(SigningKey, Scope)>) -> Self {
        Self::with_nonce_capacity(keys, DEFAULT_NONCE_CAPACITY)
    }

    /// As [`Verifier::with_scopes`], remembering at most `capacity` nonces (at least one).
    pub fn with_nonce_capacity(keys: Vec<(SigningKey, Scope)>, capacity: usize) -> Self {
        Self {
            keys: keys
                .into_iter()
                .filter(|(key, _)| !key.secret.is_empty())
                .map(|(key, scope)| (key.id, (key.secret, scope)))
                .collect(),
            nonces: HashMap::new(),
            by_timestamp: BTreeSet::new(),
            capacity: capacity.max(1),
            floor: None,
        }
    }

    /// Parses `VOXRELAY_CONTROL_PLANE_KEYS`: comma-separated `key_id:secret[:scope]` entries,
    /// rejecting empty ids and secrets. See [`parse_key_list`].
    pub fn from_key_list(list: &str) -> Result<Self, KeyListError> {
        parse_key_list(list).map(Self::with_scopes)
    }

    /// The checks that need no body, in the order [`Verifier::verify`] runs them: the headers'
    /// shape, the key id, the clock window. A server runs this before reading a body, so a
    /// sender without a key can make it read nothing. `Ok` is the key's scope; nothing is
    /// recorded.
    pub fn precheck(
        &mut self,
        unix_now: u64,
        headers: &SignedHeaders,
        method: &str,
        path_and_query: &str,
    ) -> Result<Scope, Rejection> {
        self.expire(unix_now);
        self.checked_headers(unix_now, headers, method, path_and_query)
            .map(|checked| checked.scope)
    }

    /// Checks one request. On `Ok` (the signing key's scope) the request is authentic, fresh
    /// and not a replay, and its nonce is remembered.
    pub fn verify(
        &mut self,
        unix_now: u64,
        headers: &SignedHeaders,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Scope, Rejection> {
        self.expire(unix_now);
        let CheckedHeaders {
            timestamp,
            nonce,
            received,
            scope,
        } = self.checked_headers(unix_now, headers, method, path_and_query)?;
        let (secret, _) = self
            .keys
            .get(&headers.key_id)
            .ok_or(Rejection::UnknownKey)?;
        let expected = mac_over(
            secret,
            &headers.timestamp,
            &headers.nonce,
            method,
            path_and_query,
            body,
        );
        if !bool::from(expected.ct_eq(&received)) {
            return Err(Rejection::BadSignature);
        }

        if self.nonces.contains_key(&nonce) {
            return Err(Rejection::Replayed);
        }
        self.remember(timestamp, nonce).map(|()| scope)
    }

    /// Checks 1–3 (shape, key, clock) on headers already taken apart.
    fn checked_headers(
        &self,
        unix_now: u64,
        headers: &SignedHeaders,
        method: &str,
        path_and_query: &str,
    ) -> Result<CheckedHeaders, Rejection> {
        let timestamp = parse_timestamp(&headers.timestamp).ok_or(Rejection::Malformed)?;
        let nonce = lowerhex::decode::<16>(&headers.nonce).ok_or(Rejection::Malformed)?;
        let received = headers
            .signature
            .strip_prefix(SIGNATURE_PREFIX)
            .and_then(lowerhex::decode::<32>)
            .ok_or(Rejection::Malformed)?;
        if !is_valid_key_id(&headers.key_id)
            || !is_single_line(method)
            || method.is_empty()
            || !is_single_line(path_and_query)
        {
            // A newline inside a field would let two different requests share one canonical
            // string; the HTTP layer never produces one, so treat it as malformed.
            return Err(Rejection::Malformed);
        }

        let (_, scope) = self
            .keys
            .get(&headers.key_id)
            .ok_or(Rejection::UnknownKey)?;

        if timestamp.abs_diff(unix_now) > MAX_CLOCK_SKEW_SECS
            || self.floor.is_some_and(|floor| timestamp <= floor)
        {
            return Err(Rejection::Stale);
        }
        Ok(CheckedHeaders {
            timestamp,
            nonce,
            received,
            scope: *scope,
        })
    }

    /// The scope of key `key_id`, if it is an active key.
    pub fn scope_of(&self, key_id: &str) -> Option<Scope> {
        self.keys.get(key_id).map(|(_, scope)| *scope)
    }

    /// How many nonces are remembered now (for metrics and tests).
    pub fn nonce_cache_len(&self) -> usize {
        self.nonces.len()
    }

    /// The ids of the active keys, sorted.
    pub fn key_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    fn expire(&mut self, unix_now: u64) {
        while let Some(&(timestamp, nonce)) = self.by_timestamp.first() {
            if timestamp.saturating_add(MAX_CLOCK_SKEW_SECS) >= unix_now {
                break;
            }
            self.forget(timestamp, nonce);
        }
    }

    fn remember(&mut self, timestamp: u64, nonce: [u8; 16]) -> Result<(), Rejection> {
        self.nonces.insert(nonce, timestamp);
        self.by_timestamp.insert((timestamp, nonce));
        let mut evicted_self = false;
        while self.nonces.len() > self.capacity {
            let Some(&(oldest_timestamp, oldest_nonce)) = self.by_timestamp.first() else {
                break;
            };
            evicted_self |= oldest_nonce == nonce;
            self.forget(oldest_timestamp, oldest_nonce);
        }
        // The new request was itself the oldest: the floor now covers it, so refuse it as the
        // policy refuses any timestamp it can no longer protect.
        if evicted_self {
            Err(Rejection::Stale)
        } else {
            Ok(())
        }
    }

    /// Refuses every request timestamped before `unix_secs` (as [`Rejection::Stale`]). A
    /// verifier that starts empty (a restarted process) calls this with its start time: the
    /// nonces it accepted before the restart are gone, so the requests that carried them must
    /// not pass the clock check again.
    pub fn refuse_before(&mut self, unix_secs: u64) {
        if let Some(below) = unix_secs.checked_sub(1) {
            self.floor = Some(self.floor.map_or(below, |floor| floor.max(below)));
        }
    }

    fn forget(&mut self, timestamp: u64, nonce: [u8; 16]) {
        self.by_timestamp.remove(&(timestamp, nonce));
        self.nonces.remove(&nonce);
        self.floor = Some(self.floor.map_or(timestamp, |floor| floor.max(timestamp)));
    }
}

/// The header fields of a request that passed checks 1–3.
struct CheckedHeaders {
    timestamp: u64,
    nonce: [u8; 16],
    received: [u8; 32],
    scope: Scope,
}

/// Parses `VOXRELAY_CONTROL_PLANE_KEYS`: comma-separated `key_id:secret[:scope]` entries.
///
/// Whitespace around entries, ids, secrets and scopes is ignored. The key id is everything
/// before the first `:`. When the text after the last `:` is a scope name (`bridge` or
/// `operator`), it is the entry's scope and the secret is what lies between; otherwise the whole
/// rest is the secret (so a secret may contain `:`, but not `,`) and the scope is
/// [`Scope::Bridge`]. A secret that itself ends in `:bridge` or `:operator` must therefore be
/// followed by an explicit scope.
pub fn parse_key_list(list: &str) -> Result<Vec<(SigningKey, Scope)>, KeyListError> {
    if list.trim().is_empty() {
        return Err(KeyListError::Empty);
    }
    let mut keys: Vec<(SigningKey, Scope)> = Vec::new();
    for (index, entry) in list.split(',').enumerate() {
        let entry_number = index + 1;
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(KeyListError::EmptyEntry {
                entry: entry_number,
            });
        }
        let (id, rest) = entry
            .split_once(':')
            .ok_or(KeyListError::MissingSeparator {
                entry: entry_number,
            })?;
        let (secret, scope) = match rest.rsplit_once(':') {
            Some((secret, scope)) => match Scope::parse(scope.trim()) {
                Some(scope) => (secret, scope),
                None => (rest, Scope::Bridge),
            },
            None => (rest, Scope::Bridge),
        };
        let (id, secret) = (id.trim(), secret.trim());
        if id.is_empty() {
            return Err(KeyListError::EmptyId {
                entry: entry_number,
            });
        }
        if !is_valid_key_id(id) {
            return Err(KeyListError::InvalidId {
                entry: entry_number,
            });
        }
        if secret.is_empty() {
            return Err(KeyListError::EmptySecret {
                entry: entry_number,
            });
        }
        if keys.iter().any(|(key, _)| key.id == id) {
            return Err(KeyListError::DuplicateId {
                entry: entry_number,
            });
        }
        keys.push((SigningKey::new(id, Secret::new(secret)), scope));
    }
    Ok(keys)
}

/// The MAC over the canonical string, fed piecewise so verifying allocates nothing.
fn mac_over(
    secret: &Secret,
    timestamp: &str,
    nonce: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(secret.expose().as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes keys of any length; this arm exists only to avoid an unwrap.
        Err(_) => return [0; 32],
    };
    for field in [timestamp, nonce, method, path_and_query] {
        mac.update(field.as_bytes());
        mac.update(b"\n");
    }
    let mut body_hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(body), &mut body_hex)
        .expect("a 32-byte digest is 64 hex digits");
    mac.update(&body_hex);
    mac.finalize().into_bytes().into()
}

/// Unix seconds in canonical decimal: digits only, no sign, no leading zero.
fn parse_timestamp(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let canonical = !bytes.is_empty()
        && bytes.len() <= MAX_TIMESTAMP_DIGITS
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes[0] != b'0' || bytes.len() == 1);
    if canonical { text.parse().ok() } else { None }
}

fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b',' && byte != b':')
}

fn is_single_line(field: &str) -> bool {
    !field.bytes().any(|byte| byte == b'\n' || byte == b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_verifier_refuses_what_it_may_have_seen_before() {
        let key = SigningKey::new("k1", Secret::new("s"));
        let mut verifier = Verifier::new(vec![key.clone()]);
        verifier.refuse_before(1_000_000);
        let before = sign(&key, 999_999, [1; 16], "GET", "/v1/context?to=1", b"");
        let after = sign(&key, 1_000_000, [2; 16], "GET", "/v1/context?to=1", b"");
        assert_eq!(
            verifier.verify(1_000_000, &before, "GET", "/v1/context?to=1", b""),
            Err(Rejection::Stale)
        );
        assert_eq!(
            verifier.verify(1_000_000, &after, "GET", "/v1/context?to=1", b""),
            Ok(Scope::Bridge)
        );
    }

    const VECTORS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/control-plane-signature-vectors.json"
    ));

    const NOW: u64 = 1_750_000_000;
    const PATH: &str = "/v1/context?to=%2B15551234567&from=%2B15557654321&call_sid=CA01";

    struct Vector {
        key: SigningKey,
        timestamp: String,
        nonce: String,
        method: String,
        path_and_query: String,
        body: String,
        canonical_string: String,
        signature: String,
    }

    fn field(value: &serde_json::Value, name: &str) -> String {
        match value.get(name).and_then(serde_json::Value::as_str) {
            Some(text) => text.to_owned(),
            None => panic!("vector field {name} missing"),
        }
    }

    fn vectors() -> Vec<Vector> {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).expect("fixture is JSON");
        let list = doc["vectors"].as_array().expect("vectors array");
        list.iter()
            .map(|vector| Vector {
                key: SigningKey::new(
                    field(vector, "key_id"),
                    Secret::new(field(vector, "secret")),
                ),
                timestamp: field(vector, "timestamp"),
                nonce: field(vector, "nonce"),
                method: field(vector, "method"),
                path_and_query: field(vector, "path_and_query"),
                body: field(vector, "body"),
                canonical_string: field(vector, "canonical_string"),
                signature: field(vector, "signature"),
            })
            .collect()
    }

    fn fixture_keys() -> Vec<SigningKey> {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).expect("fixture is JSON");
        doc["keys"]
            .as_array()
            .expect("keys array")
            .iter()
            .map(|key| SigningKey::new(field(key, "key_id"), Secret::new(field(key, "secret"))))
            .collect()
    }

    fn key(id: &str, secret: &str) -> SigningKey {
        SigningKey::new(id, Secret::new(secret))
    }

    fn nonce(n: u128) -> [u8; 16] {
        n.to_be_bytes()
    }

    fn nonce_array(hex: &str) -> [u8; 16] {
        lowerhex::decode::<16>(hex).expect("fixture nonce is 32 lowercase hex")
    }

    #[test]
    fn fixture_has_the_required_coverage() {
        let vectors = vectors();
        assert!(vectors.len() >= 6);
        let has = |predicate: &dyn Fn(&Vector) -> bool| vectors.iter().any(predicate);
        assert!(has(&|v| v.method == "GET" && v.path_and_query.contains('?')));
        assert!(has(&|v| v.method == "POST" && v.body.starts_with('{')));
        assert!(has(&|v| v.body.is_empty()));
        assert!(has(&|v| !v.body.is_ascii()));
        let mut key_ids: Vec<&str> = vectors.iter().map(|v| v.key.id.as_str()).collect();
        key_ids.sort_unstable();
        key_ids.dedup();
        assert!(key_ids.len() >= 2);
    }

    #[test]
    fn every_vector_has_its_canonical_string_and_signature() {
        for vector in vectors() {
            let canonical = canonical_string(
                &vector.timestamp,
                &vector.nonce,
                &vector.method,
                &vector.path_and_query,
                vector.body.as_bytes(),
            );
            assert_eq!(canonical, vector.canonical_string);

            let unix_now = vector.timestamp.parse().expect("fixture timestamp");
            let signed = sign(
                &vector.key,
                unix_now,
                nonce_array(&vector.nonce),
                &vector.method,
                &vector.path_and_query,
                vector.body.as_bytes(),
            );
            assert_eq!(
                signed.signature, vector.signature,
                "{}",
                vector.canonical_string
            );
            assert_eq!(signed.timestamp, vector.timestamp);
            assert_eq!(signed.nonce, vector.nonce);
            assert_eq!(signed.key_id, vector.key.id);
        }
    }

    #[test]
    fn the_piecewise_mac_equals_the_mac_of_the_canonical_string() {
        let secret = Secret::new("s3cret");
        let body = "Grüße 👋".as_bytes();
        let canonical = canonical_string("17", "00ff", "PUT", "/a?b=c", body);
        let mut mac = HmacSha256::new_from_slice(b"s3cret").expect("any key length");
        mac.update(canonical.as_bytes());
        let whole: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(
            mac_over(&secret, "17", "00ff", "PUT", "/a?b=c", body),
            whole
        );
    }

    #[test]
    fn every_vector_verifies_with_both_fixture_keys_active() {
        for vector in vectors() {
            let unix_now = vector.timestamp.parse().expect("fixture timestamp");
            let headers = SignedHeaders {
                timestamp: vector.timestamp.clone(),
                nonce: vector.nonce.clone(),
                key_id: vector.key.id.clone(),
                signature: vector.signature.clone(),
            };
            // Two vectors share a nonce under different keys; a fresh verifier per vector
            // keeps this test about signatures, not replay.
            let mut fresh = Verifier::new(fixture_keys());
            assert_eq!(
                fresh.verify(
                    unix_now,
                    &headers,
                    &vector.method,
                    &vector.path_and_query,
                    vector.body.as_bytes()
                ),
                Ok(Scope::Bridge),
                "{}",
                vector.canonical_string
            );
        }
    }

    #[test]
    fn a_signed_request_verifies_once_and_its_replay_is_rejected() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let headers = sign(&signing_key, NOW, nonce(7), "GET", PATH, b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", PATH, b""),
            Ok(Scope::Bridge)
        );
        assert_eq!(
            verifier.verify(NOW + 1, &headers, "GET", PATH, b""),
            Err(Rejection::Replayed)
        );
        // The same nonce under a fresh, validly signed timestamp is still a reused nonce.
        let again = sign(&signing_key, NOW + 2, nonce(7), "GET", PATH, b"");
        assert_eq!(
            verifier.verify(NOW + 2, &again, "GET", PATH, b""),
            Err(Rejection::Replayed)
        );
    }

    #[test]
    fn a_replay_after_its_window_is_stale_not_accepted() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let headers = sign(&signing_key, NOW, nonce(7), "GET", PATH, b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", PATH, b""),
            Ok(Scope::Bridge)
        );
        let late = NOW + MAX_CLOCK_SKEW_SECS + 1;
        assert_eq!(
            verifier.verify(late, &headers, "GET", PATH, b""),
            Err(Rejection::Stale)
        );
        assert_eq!(verifier.nonce_cache_len(), 0);
    }

    #[test]
    fn clock_skew_up_to_the_window_is_accepted_and_beyond_it_rejected() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let cases = [
            (NOW - 300, Ok(Scope::Bridge)),
            (NOW + 300, Ok(Scope::Bridge)),
            (NOW - 301, Err(Rejection::Stale)),
            (NOW + 301, Err(Rejection::Stale)),
        ];
        for (index, (timestamp, expected)) in cases.into_iter().enumerate() {
            let headers = sign(
                &signing_key,
                timestamp,
                nonce(100 + index as u128),
                "GET",
                PATH,
                b"",
            );
            assert_eq!(
                verifier.verify(NOW, &headers, "GET", PATH, b""),
                expected,
                "timestamp {timestamp}"
            );
        }
    }

    #[test]
    fn either_of_two_rotated_keys_verifies() {
        let old = key("2025-06", "old secret");
        let new = key("2025-09", "new secret");
        let mut verifier = Verifier::new(vec![old.clone(), new.clone()]);
        for (index, signing_key) in [&old, &new].into_iter().enumerate() {
            let headers = sign(
                signing_key,
                NOW,
                nonce(index as u128),
                "POST",
                "/v1/x",
                b"{}",
            );
            assert_eq!(
                verifier.verify(NOW, &headers, "POST", "/v1/x", b"{}"),
                Ok(Scope::Bridge)
            );
        }
        // A secret from one key under the other's id is a bad signature, not a pass.
        let crossed = sign(
            &key("2025-06", "new secret"),
            NOW,
            nonce(9),
            "GET",
            "/",
            b"",
        );
        assert_eq!(
            verifier.verify(NOW, &crossed, "GET", "/", b""),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn an_unknown_key_id_is_rejected_before_anything_else() {
        let mut verifier = Verifier::new(vec![key("k1", "secret-one")]);
        let headers = sign(&key("k2", "secret-one"), NOW, nonce(1), "GET", PATH, b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", PATH, b""),
            Err(Rejection::UnknownKey)
        );
        // Even when its clock is also off: the key is checked before the window.
        let stale = sign(
            &key("k2", "secret-one"),
            NOW - 10_000,
            nonce(2),
            "GET",
            PATH,
            b"",
        );
        assert_eq!(
            verifier.verify(NOW, &stale, "GET", PATH, b""),
            Err(Rejection::UnknownKey)
        );
    }

    #[test]
    fn tampering_with_body_method_or_path_is_a_bad_signature() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let body = br#"{"call_sid":"CA1","tenant_id":"t1","arguments":{}}"#;
        let headers = sign(
            &signing_key,
            NOW,
            nonce(1),
            "POST",
            "/v1/tools/take_message",
            body,
        );
        let tampered_body = br#"{"call_sid":"CA1","tenant_id":"t2","arguments":{}}"#;
        let attempts: [(&str, &str, &[u8]); 4] = [
            ("POST", "/v1/tools/take_message", tampered_body),
            ("PUT", "/v1/tools/take_message", body),
            ("POST", "/v1/tools/lookup_business_hours", body),
            ("POST", "/v1/tools/take_message?x=1", body),
        ];
        for (method, path, attempt_body) in attempts {
            assert_eq!(
                verifier.verify(NOW, &headers, method, path, attempt_body),
                Err(Rejection::BadSignature),
                "{method} {path}"
            );
        }
        // Failed attempts burned nothing: the genuine request still goes through once.
        assert_eq!(verifier.nonce_cache_len(), 0);
        assert_eq!(
            verifier.verify(NOW, &headers, "POST", "/v1/tools/take_message", body),
            Ok(Scope::Bridge)
        );
    }

    #[test]
    fn a_forged_signature_cannot_burn_a_genuine_nonce() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let genuine = sign(&signing_key, NOW, nonce(42), "GET", PATH, b"");
        let forged = SignedHeaders {
            signature: format!("v1={}", "0".repeat(64)),
            ..genuine.clone()
        };
        assert_eq!(
            verifier.verify(NOW, &forged, "GET", PATH, b""),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verifier.verify(NOW, &genuine, "GET", PATH, b""),
            Ok(Scope::Bridge)
        );
    }

    #[test]
    fn malformed_headers_are_rejected_as_malformed() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let good = sign(&signing_key, NOW, nonce(5), "GET", PATH, b"");
        let hex_sig = good.signature.trim_start_matches("v1=").to_owned();
        let with = |edit: &dyn Fn(&mut SignedHeaders)| {
            let mut headers = good.clone();
            edit(&mut headers);
            headers
        };
        let cases = [
            with(&|h| h.signature = hex_sig.clone()),
            with(&|h| h.signature = format!("v2={hex_sig}")),
            with(&|h| h.signature = format!("v1={}", hex_sig.to_uppercase())),
            with(&|h| h.signature = format!("v1={}", &hex_sig[..62])),
            with(&|h| h.signature = format!("v1={hex_sig}00")),
            with(&|h| h.signature = format!("v1={}zz", &hex_sig[..62])),
            with(&|h| h.signature = format!("{}, v1={hex_sig}", good.signature)),
            with(&|h| h.nonce = "0123".into()),
            with(&|h| h.nonce = "0123456789ABCDEF0123456789ABCDEF".into()),
            with(&|h| h.nonce = "0123456789abcdef0123456789abcdeg".into()),
            with(&|h| h.nonce = "é123456789abcdef0123456789abcde".into()),
            with(&|h| h.timestamp = String::new()),
            with(&|h| h.timestamp = "-1750000000".into()),
            with(&|h| h.timestamp = "+1750000000".into()),
            with(&|h| h.timestamp = "01750000000".into()),
            with(&|h| h.timestamp = "1750000000.5".into()),
            with(&|h| h.timestamp = "99999999999999999999999".into()),
            with(&|h| h.key_id = String::new()),
            with(&|h| h.key_id = "k 1".into()),
        ];
        for headers in &cases {
            assert_eq!(
                verifier.verify(NOW, headers, "GET", PATH, b""),
                Err(Rejection::Malformed),
                "{headers:?}"
            );
        }
        assert_eq!(
            verifier.verify(NOW, &good, "GET", "/v1/a\n/b", b""),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            verifier.verify(NOW, &good, "", PATH, b""),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            verifier.verify(NOW, &good, "GET", PATH, b""),
            Ok(Scope::Bridge)
        );
    }

    #[test]
    fn headers_are_read_by_name_and_a_missing_one_is_malformed() {
        let headers = sign(&key("k1", "s"), NOW, nonce(3), "GET", "/", b"");
        let pairs = headers.pairs();
        let lookup = |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        assert_eq!(SignedHeaders::from_headers(lookup), Ok(headers.clone()));
        let without_nonce = |name: &str| {
            if name == HEADER_NONCE {
                None
            } else {
                lookup(name)
            }
        };
        assert_eq!(
            SignedHeaders::from_headers(without_nonce),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn the_nonce_cache_stays_bounded_under_a_flood_with_advancing_time() {
        let signing_key = key("k1", "secret-one");
        let capacity = 20_000;
        let mut verifier =
            Verifier::with_nonce_capacity(vec![(signing_key.clone(), Scope::Bridge)], capacity);
        let mut max_len = 0;
        // 100k valid requests, 100 per second: 30k would be live at once, so both expiry and
        // the capacity bound are exercised.
        for i in 0..100_000u64 {
            let now = NOW + i / 100;
            let headers = sign(
                &signing_key,
                now,
                nonce(u128::from(i)),
                "POST",
                "/v1/r",
                b"",
            );
            assert_eq!(
                verifier.verify(now, &headers, "POST", "/v1/r", b""),
                Ok(Scope::Bridge)
            );
            max_len = max_len.max(verifier.nonce_cache_len());
        }
        assert_eq!(max_len, capacity);
        assert_eq!(verifier.by_timestamp.len(), verifier.nonces.len());
    }

    #[test]
    fn expiry_alone_keeps_the_cache_to_one_window_of_requests() {
        let signing_key = key("k1", "secret-one");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        for i in 0..20_000u64 {
            let now = NOW + i / 10;
            let headers = sign(&signing_key, now, nonce(u128::from(i)), "GET", "/", b"");
            assert_eq!(
                verifier.verify(now, &headers, "GET", "/", b""),
                Ok(Scope::Bridge)
            );
        }
        // 10 per second for the 301 seconds a nonce can be live.
        assert!(
            verifier.nonce_cache_len() <= 10 * 301,
            "{}",
            verifier.nonce_cache_len()
        );
        assert!(verifier.nonce_cache_len() >= 10 * 300);
    }

    #[test]
    fn an_evicted_nonce_can_never_be_replayed() {
        let signing_key = key("k1", "secret-one");
        let mut verifier =
            Verifier::with_nonce_capacity(vec![(signing_key.clone(), Scope::Bridge)], 3);
        let first = sign(&signing_key, NOW - 10, nonce(1), "GET", "/", b"");
        assert_eq!(
            verifier.verify(NOW, &first, "GET", "/", b""),
            Ok(Scope::Bridge)
        );
        for n in 2..=4u128 {
            let headers = sign(&signing_key, NOW, nonce(n), "GET", "/", b"");
            assert_eq!(
                verifier.verify(NOW, &headers, "GET", "/", b""),
                Ok(Scope::Bridge)
            );
        }
        assert_eq!(verifier.nonce_cache_len(), 3);
        // `first` was evicted: its replay must still fail, as stale.
        assert_eq!(
            verifier.verify(NOW, &first, "GET", "/", b""),
            Err(Rejection::Stale)
        );
        // A new request older than everything remembered would be evicted at once: refused.
        let older = sign(&signing_key, NOW - 10, nonce(99), "GET", "/", b"");
        assert_eq!(
            verifier.verify(NOW, &older, "GET", "/", b""),
            Err(Rejection::Stale)
        );
        let full_and_older = sign(&signing_key, NOW - 5, nonce(98), "GET", "/", b"");
        assert_eq!(
            verifier.verify(NOW, &full_and_older, "GET", "/", b""),
            Err(Rejection::Stale)
        );
        assert_eq!(verifier.nonce_cache_len(), 3);
    }

    #[test]
    fn key_lists_parse_and_reject_empty_parts() {
        let verifier =
            Verifier::from_key_list(" cp-2025-06:whsec_abc , cp-2025-09:rotated secret: 7c1e!")
                .expect("valid list");
        assert_eq!(verifier.key_ids(), ["cp-2025-06", "cp-2025-09"]);
        assert_eq!(
            verifier
                .keys
                .get("cp-2025-09")
                .map(|(secret, _)| secret.expose()),
            Some("rotated secret: 7c1e!")
        );

        let cases = [
            ("", KeyListError::Empty),
            ("  ", KeyListError::Empty),
            ("a:1,", KeyListError::EmptyEntry { entry: 2 }),
            ("a:1,,b:2", KeyListError::EmptyEntry { entry: 2 }),
            ("a1", KeyListError::MissingSeparator { entry: 1 }),
            (":secret", KeyListError::EmptyId { entry: 1 }),
            ("a:1, :2", KeyListError::EmptyId { entry: 2 }),
            ("a:", KeyListError::EmptySecret { entry: 1 }),
            ("a:1,b:  ", KeyListError::EmptySecret { entry: 2 }),
            ("key one:1", KeyListError::InvalidId { entry: 1 }),
            ("a:1,a:2", KeyListError::DuplicateId { entry: 2 }),
        ];
        for (list, expected) in cases {
            assert_eq!(
                Verifier::from_key_list(list).map(|_| ()),
                Err(expected),
                "{list:?}"
            );
        }
    }

    #[test]
    fn key_list_entries_carry_an_optional_scope() {
        let keys = parse_key_list(
            "a:s1, b:s2:operator ,c:s:3:bridge,d:x:admin, e : s e : operator,f:operator,g:s:operator:operator",
        )
        .expect("valid list");
        let found: Vec<(&str, &str, Scope)> = keys
            .iter()
            .map(|(key, scope)| (key.id.as_str(), key.secret.expose(), *scope))
            .collect();
        assert_eq!(
            found,
            [
                ("a", "s1", Scope::Bridge),
                ("b", "s2", Scope::Operator),
                ("c", "s:3", Scope::Bridge),
                // Not a scope name: part of the secret, which may contain `:`.
                ("d", "x:admin", Scope::Bridge),
                ("e", "s e", Scope::Operator),
                // One field after the id is always the secret.
                ("f", "operator", Scope::Bridge),
                ("g", "s:operator", Scope::Operator),
            ]
        );
        assert_eq!(
            parse_key_list("a::operator").map(|_| ()),
            Err(KeyListError::EmptySecret { entry: 1 })
        );
        assert_eq!(
            parse_key_list("a:1,b: :bridge").map(|_| ()),
            Err(KeyListError::EmptySecret { entry: 2 })
        );
        let verifier = Verifier::from_key_list("ops:s:operator,br:t").expect("valid list");
        assert_eq!(verifier.scope_of("ops"), Some(Scope::Operator));
        assert_eq!(verifier.scope_of("br"), Some(Scope::Bridge));
        assert_eq!(verifier.scope_of("nobody"), None);
        // The error never echoes an entry.
        let error = parse_key_list("k:hunter2,k:hunter2:operator").unwrap_err();
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn a_verified_request_carries_its_keys_scope() {
        let operator = key("ops", "ops-secret");
        let mut verifier = Verifier::with_scopes(vec![
            (operator.clone(), Scope::Operator),
            (key("br", "b"), Scope::Bridge),
        ]);
        let headers = sign(&operator, NOW, nonce(1), "GET", "/v1/calls", b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", "/v1/calls", b""),
            Ok(Scope::Operator)
        );
    }

    #[test]
    fn the_precheck_refuses_what_needs_no_body_and_records_nothing() {
        let signing_key = key("k1", "secret");
        let mut verifier = Verifier::new(vec![signing_key.clone()]);
        let good = sign(&signing_key, NOW, nonce(1), "POST", "/v1/r", b"{\"a\":1}");
        // Passes without the body (the MAC is not checked yet), and remembers nothing.
        assert_eq!(
            verifier.precheck(NOW, &good, "POST", "/v1/r"),
            Ok(Scope::Bridge)
        );
        assert_eq!(verifier.nonce_cache_len(), 0);
        let stranger = sign(&key("k9", "secret"), NOW, nonce(2), "POST", "/v1/r", b"");
        assert_eq!(
            verifier.precheck(NOW, &stranger, "POST", "/v1/r"),
            Err(Rejection::UnknownKey)
        );
        let stale = sign(&signing_key, NOW - 301, nonce(3), "POST", "/v1/r", b"");
        assert_eq!(
            verifier.precheck(NOW, &stale, "POST", "/v1/r"),
            Err(Rejection::Stale)
        );
        let mut malformed = good.clone();
        malformed.timestamp = format!("0{}", good.timestamp);
        assert_eq!(
            verifier.precheck(NOW, &malformed, "POST", "/v1/r"),
            Err(Rejection::Malformed)
        );
        // The full check still decides on the body.
        assert_eq!(
            verifier.verify(NOW, &good, "POST", "/v1/r", b"{}"),
            Err(Rejection::BadSignature)
        );
        assert_eq!(
            verifier.verify(NOW, &good, "POST", "/v1/r", b"{\"a\":1}"),
            Ok(Scope::Bridge)
        );
    }

    #[test]
    fn keys_from_a_list_verify_their_own_signatures() {
        let mut verifier = Verifier::from_key_list("a:alpha,b:beta").expect("valid list");
        let headers = sign(&key("b", "beta"), NOW, nonce(1), "GET", "/", b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", "/", b""),
            Ok(Scope::Bridge)
        );
    }

    #[test]
    fn an_empty_secret_never_verifies() {
        let mut verifier = Verifier::new(vec![key("open", "")]);
        let headers = sign(&key("open", ""), NOW, nonce(1), "GET", "/", b"");
        assert_eq!(
            verifier.verify(NOW, &headers, "GET", "/", b""),
            Err(Rejection::UnknownKey)
        );
    }

    #[test]
    fn debug_output_and_errors_never_show_secrets() {
        let verifier = Verifier::from_key_list("k1:hunter2-secret").expect("valid list");
        let signing_key = key("k1", "hunter2-secret");
        let text = format!("{verifier:?} {signing_key:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("k1"));
        let error = Verifier::from_key_list("k1:hunter2-secret,k1:hunter2-secret")
            .map(|_| ())
            .expect_err("duplicate id");
        assert!(!error.to_string().contains("hunter2"));
    }

    #[test]
    fn reason_codes_are_fixed_and_match_display() {
        let all = [
            (Rejection::Malformed, "malformed"),
            (Rejection::Stale, "stale"),
            (Rejection::Replayed, "replayed"),
            (Rejection::UnknownKey, "unknown_key"),
            (Rejection::BadSignature, "bad_signature"),
        ];
        for (rejection, code) in all {
            assert_eq!(rejection.as_str(), code);
            assert_eq!(rejection.to_string(), code);
        }
    }
}
