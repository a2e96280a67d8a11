//! Twilio request signatures (`X-Twilio-Signature`).
//!
//! Owns the check that a webhook or a Media Streams WebSocket handshake really comes from
//! Twilio: `base64(HMAC-SHA1(auth_token, url + key1 + value1 + key2 + value2 …))` with the
//! parameters sorted by key then value and identical pairs counted once; a JSON body is not in
//! the string but pinned by the URL's `bodySHA256` query parameter (hex SHA-256 of the body).
//! Because proxies and Twilio itself disagree about ports and URL encoding, a signature is
//! accepted if it matches any of a few spellings of the URL ([`candidate_urls`]).
//! Invariants: the auth token lives only inside a [`Secret`]; every comparison of a received
//! value with a computed one is constant-time; an empty signature never validates.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Secret;

type HmacSha1 = Hmac<Sha1>;

/// The query parameter that carries the hex SHA-256 of a JSON body.
const BODY_SHA256_PARAM: &str = "bodySHA256";

/// `base64(HMAC-SHA1(auth_token, url + sorted key/value concatenation))`.
///
/// Pairs are sorted by key, then by value, and a `(key, value)` pair repeated in `params`
/// counts once, as in Twilio's helper libraries.
pub fn compute_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    signature_over(auth_token, url, &sorted_unique(params))
}

/// Parameters in signing order: by key, then value, each distinct pair once.
fn sorted_unique(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

fn signature_over(auth_token: &str, url: &str, sorted_params: &[(&str, &str)]) -> String {
    // HMAC accepts keys of any length, so this never fails.
    let mut mac = match HmacSha1::new_from_slice(auth_token.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(url.as_bytes());
    for (key, value) in sorted_params {
        mac.update(key.as_bytes());
        mac.update(value.as_bytes());
    }
    BASE64.encode(mac.finalize().into_bytes())
}

/// The spellings of `url` a valid signature may have been computed over: the URL as given,
/// with the scheme's default port added (`:443` for https/wss, `:80` for http/ws) when it has
/// no port, with its port removed when it has one, the same without credentials, and the
/// WHATWG-normalised form of each (the `url` crate's serialisation, which for example encodes
/// `'` as `%27` in the query of an http(s) URL, as Twilio does before signing). No duplicates,
/// the URL as given first.
pub fn candidate_urls(url: &str) -> Vec<String> {
    let mut bases = vec![url.to_owned()];
    if let Ok(parsed) = url::Url::parse(url) {
        push_unique(&mut bases, parsed.as_str().to_owned());
    }
    let mut candidates = Vec::with_capacity(bases.len() * 6);
    for base in &bases {
        let Some(parts) = UrlParts::split(base) else {
            push_unique(&mut candidates, base.clone());
            continue;
        };
        let credential_choices: &[bool] = if parts.userinfo.is_some() {
            &[true, false]
        } else {
            &[true]
        };
        for &with_credentials in credential_choices {
            push_unique(&mut candidates, parts.join(with_credentials, parts.port));
            if parts.port.is_some() {
                push_unique(&mut candidates, parts.join(with_credentials, None));
            } else if let Some(default_port) = parts.default_port() {
                push_unique(
                    &mut candidates,
                    parts.join(with_credentials, Some(default_port)),
                );
            }
        }
    }
    // Normalising a port-adjusted spelling can produce one more distinct URL (for example a
    // host in upper case with the port removed).
    for index in 0..candidates.len() {
        if let Ok(parsed) = url::Url::parse(&candidates[index]) {
            push_unique(&mut candidates, parsed.as_str().to_owned());
        }
    }
    candidates
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// A URL cut at the places the candidates differ, without normalising anything else.
struct UrlParts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    host: &'a str,
    port: Option<&'a str>,
    /// Path, query and fragment, untouched.
    rest: &'a str,
}

impl<'a> UrlParts<'a> {
    fn split(url: &'a str) -> Option<Self> {
        let (scheme, after_scheme) = url.split_once("://")?;
        let authority_end = after_scheme
            .find(['/', '?', '#'])
            .unwrap_or(after_scheme.len());
        let (authority, rest) = after_scheme.split_at(authority_end);
        let (userinfo, host_port) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        // An IPv6 literal has colons of its own; the port colon comes after its bracket.
        let port_search_from = if host_port.starts_with('[') {
            host_port.find(']')?
        } else {
            0
        };
        let (host, port) = match host_port[port_search_from..].rfind(':') {
            Some(offset) => {
                let colon = port_search_from + offset;
                (&host_port[..colon], Some(&host_port[colon + 1..]))
            }
            None => (host_port, None),
        };
        Some(Self {
            scheme,
            userinfo,
            host,
            port,
            rest,
        })
    }

    fn default_port(&self) -> Option<&'static str> {
        if self.scheme.eq_ignore_ascii_case("https") || self.scheme.eq_ignore_ascii_case("wss") {
            Some("443")
        } else if self.scheme.eq_ignore_ascii_case("http") || self.scheme.eq_ignore_ascii_case("ws")
        {
            Some("80")
        } else {
            None
        }
    }

    fn join(&self, with_credentials: bool, port: Option<&str>) -> String {
        let mut url = String::with_capacity(
            self.scheme.len()
                + self.host.len()
                + self.rest.len()
                + 16
                + self.userinfo.map_or(0, str::len),
        );
        url.push_str(self.scheme);
        url.push_str("://");
        if let (true, Some(userinfo)) = (with_credentials, self.userinfo) {
            url.push_str(userinfo);
            url.push('@');
        }
        url.push_str(self.host);
        if let Some(port) = port {
            url.push(':');
            url.push_str(port);
        }
        url.push_str(self.rest);
        url
    }
}

/// The value of `name` in the query of `url`, taken verbatim (no percent-decoding: the values
/// looked up here are hex digests).
fn query_param<'u>(url: &'u str, name: &str) -> Option<&'u str> {
    let (_, after_question) = url.split_once('?')?;
    let query = after_question
        .split_once('#')
        .map_or(after_question, |(query, _)| query);
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

fn constant_time_str_eq(a: &str, b: &str) -> bool {
    // `ct_eq` on slices of different lengths is false without comparing contents.
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Whether `body` hashes to `expected_hex` (hex SHA-256, either case), in constant time.
pub fn body_matches_sha256(body: &[u8], expected_hex: &str) -> bool {
    let digest = Sha256::digest(body);
    let mut computed = [0u8; 64];
    // Lowercase, into a stack buffer: no allocation per webhook. It fails only when the
    // lengths disagree, which 32 bytes into 64 never do.
    if hex::encode_to_slice(digest, &mut computed).is_err() {
        return false;
    }
    let expected = expected_hex.as_bytes();
    if expected.len() != computed.len() {
        return false;
    }
    let mut expected_lower = [0u8; 64];
    for (lower, byte) in expected_lower.iter_mut().zip(expected) {
        *lower = byte.to_ascii_lowercase();
    }
    bool::from(computed.ct_eq(&expected_lower))
}

/// Checks `X-Twilio-Signature` headers against the account's auth token.
#[derive(Debug, Clone)]
pub struct SignatureValidator {
    auth_token: Secret,
}

impl SignatureValidator {
    pub fn new(auth_token: Secret) -> Self {
        Self { auth_token }
    }

    /// A form-encoded POST (`application/x-www-form-urlencoded`): `params` are the decoded
    /// form fields, `url` the full URL Twilio requested, query included.
    pub fn validate_form(&self, url: &str, params: &[(String, String)], signature: &str) -> bool {
        self.matches_any(&candidate_urls(url), &sorted_unique(params), signature)
    }

    /// A JSON POST: the URL must carry `bodySHA256` equal to the body's hash, and the signature
    /// is computed over the URL alone.
    pub fn validate_json(&self, url: &str, body: &[u8], signature: &str) -> bool {
        let Some(expected_hash) = query_param(url, BODY_SHA256_PARAM) else {
            return false;
        };
        // Evaluate both halves so the time taken does not say which one failed.
        let body_ok = body_matches_sha256(body, expected_hash);
        let signature_ok = self.matches_any(&candidate_urls(url), &[], signature);
        body_ok & signature_ok
    }

    /// A Media Streams WebSocket handshake: the signature covers the `wss://` URL Twilio
    /// connected to, with no parameters. An `https://`/`http://` URL (as a TLS-terminating
    /// proxy reports it) is checked as `wss://`/`ws://`, and the URL is also tried with a
    /// trailing `/` on its path.
    pub fn validate_websocket(&self, wss_url: &str, signature: &str) -> bool {
        let websocket_url = to_websocket_scheme(wss_url);
        let mut candidates = candidate_urls(&websocket_url);
        if let Some(with_slash) = with_trailing_slash(&websocket_url) {
            for candidate in candidate_urls(&with_slash) {
                push_unique(&mut candidates, candidate);
            }
        }
        self.matches_any(&candidates, &[], signature)
    }

    fn matches_any(
        &self,
        urls: &[String],
        sorted_params: &[(&str, &str)],
        signature: &str,
    ) -> bool {
        if signature.is_empty() {
            return false;
        }
        let token = self.auth_token.expose();
        // Every candidate is computed and compared, so timing does not reveal which matched.
        urls.iter().fold(false, |matched, url| {
            let expected = signature_over(token, url, sorted_params);
            matched | constant_time_str_eq(&expected, signature)
        })
    }
}

fn to_websocket_scheme(url: &str) -> String {
    for (from, to) in [("https://", "wss://"), ("http://", "ws://")] {
        if url
            .get(..from.len())
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case(from))
        {
            return format!("{to}{}", &url[from.len()..]);
        }
    }
    url.to_owned()
}

/// `url` with a `/` appended to its path, or `None` if the path already ends in one.
fn with_trailing_slash(url: &str) -> Option<String> {
    let path_end = url.find(['?', '#']).unwrap_or(url.len());
    let (before, after) = url.split_at(path_end);
    if before.ends_with('/') {
        return None;
    }
    Some(format!("{before}/{after}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const VECTORS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/twilio-signature-vectors.json"
    ));

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).expect("vectors are JSON")
    }

    fn string_pairs(params: &Value) -> Vec<(String, String)> {
        params
            .as_object()
            .map(|object| {
                object
                    .iter()
                    .map(|(key, value)| (key.clone(), value.as_str().expect("string").to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn validator() -> SignatureValidator {
        SignatureValidator::new(Secret::new(
            vectors()["auth_token"].as_str().expect("token"),
        ))
    }

    #[test]
    fn every_vector_case_gives_its_verdict() {
        let vectors = vectors();
        let validator = validator();
        let cases = vectors["cases"].as_array().expect("cases");
        assert!(cases.len() >= 12);
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let url = case["url"].as_str().expect("url");
            let signature = case["signature"].as_str().expect("signature");
            let expected = case["valid"].as_bool().expect("valid");
            let verdict = match case.get("body") {
                Some(body) => {
                    validator.validate_json(url, body.as_str().expect("body").as_bytes(), signature)
                }
                None => validator.validate_form(url, &string_pairs(&case["params"]), signature),
            };
            assert_eq!(verdict, expected, "case {name:?}");
        }
    }

    #[test]
    fn body_hash_cases_give_their_verdict() {
        let vectors = vectors();
        let token = vectors["auth_token"].as_str().expect("token");
        let validator = validator();
        for case in vectors["body_hash_cases"].as_array().expect("body cases") {
            let body = case["body"].as_str().expect("body").as_bytes();
            let hash = case["sha256_hex"].as_str().expect("hash");
            let expected = case["valid"].as_bool().expect("valid");
            assert_eq!(body_matches_sha256(body, hash), expected, "{hash}");
            // Through the validator, with a signature that is right for the URL itself, the
            // verdict rests on the body hash alone.
            let url = format!("https://mycompany.com/myapp.php?{BODY_SHA256_PARAM}={hash}");
            let signature = compute_signature(token, &url, &[]);
            assert_eq!(
                validator.validate_json(&url, body, &signature),
                expected,
                "{hash}"
            );
        }
        // Upper-case hex is the same digest.
        assert!(body_matches_sha256(
            b"{}",
            "44136FA355B3678A1146AD16F7E8649E94FB4FC21FE77E8310C060F61CAAFF8A"
        ));
    }

    #[test]
    fn compute_signature_matches_the_reference_vector() {
        let vectors = vectors();
        let case = &vectors["cases"][0];
        assert_eq!(
            compute_signature(
                "12345",
                case["url"].as_str().expect("url"),
                &string_pairs(&case["params"])
            ),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }

    #[test]
    fn params_sort_by_key_then_value_and_identical_pairs_count_once() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let url = "https://example.com/hook";
        let canonical =
            compute_signature("tok", url, &pairs(&[("a", "1"), ("a", "2"), ("b", "0")]));
        assert_eq!(
            canonical,
            compute_signature(
                "tok",
                url,
                &pairs(&[("b", "0"), ("a", "2"), ("a", "1"), ("a", "2")])
            )
        );
        // The documented string: url + "a1" + "a2" + "b0".
        let mut mac = HmacSha1::new_from_slice(b"tok").expect("hmac key");
        mac.update(b"https://example.com/hooka1a2b0");
        assert_eq!(canonical, BASE64.encode(mac.finalize().into_bytes()));
        // Sorting the concatenated "keyvalue" strings instead (twilio-go's bug) would put "a1"
        // before "ab"; sorting by key puts key "a" (value "b") before key "a1".
        let by_key = compute_signature("tok", url, &pairs(&[("a", "b"), ("a1", "")]));
        let mut mac = HmacSha1::new_from_slice(b"tok").expect("hmac key");
        mac.update(b"https://example.com/hookaba1");
        assert_eq!(by_key, BASE64.encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn empty_or_foreign_signatures_never_validate() {
        let validator = validator();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert!(!validator.validate_form(url, &[], ""));
        assert!(!validator.validate_websocket("wss://example.com/media", ""));
        assert!(!validator.validate_json(url, b"", ""));
        let other = SignatureValidator::new(Secret::new("54321"));
        let good = compute_signature("12345", url, &[]);
        assert!(validator.validate_form(url, &[], &good));
        assert!(!other.validate_form(url, &[], &good));
    }

    #[test]
    fn websocket_urls_with_and_without_trailing_slash() {
        let validator = validator();
        let signed_plain = compute_signature("12345", "wss://example.com/media", &[]);
        let signed_slash = compute_signature("12345", "wss://example.com/media/", &[]);
        assert!(validator.validate_websocket("wss://example.com/media", &signed_plain));
        assert!(validator.validate_websocket("wss://example.com/media", &signed_slash));
        assert!(!validator.validate_websocket("wss://example.com/other", &signed_plain));
        // Behind a TLS-terminating proxy the server sees https; Twilio signed wss.
        assert!(validator.validate_websocket("https://example.com/media", &signed_plain));
        // An https signature is not a wss signature.
        let signed_https = compute_signature("12345", "https://example.com/media", &[]);
        assert!(!validator.validate_websocket("wss://example.com/media", &signed_https));
    }

    #[test]
    fn websocket_urls_with_and_without_default_port() {
        let validator = validator();
        let signed_with_port = compute_signature("12345", "wss://example.com:443/media", &[]);
        let signed_without = compute_signature("12345", "wss://example.com/media", &[]);
        for seen in ["wss://example.com/media", "wss://example.com:443/media"] {
            assert!(
                validator.validate_websocket(seen, &signed_with_port),
                "{seen}"
            );
            assert!(
                validator.validate_websocket(seen, &signed_without),
                "{seen}"
            );
        }
        let signed_other_port = compute_signature("12345", "wss://example.com:8443/media", &[]);
        assert!(!validator.validate_websocket("wss://example.com/media", &signed_other_port));
    }

    #[test]
    fn candidate_urls_cover_ports_credentials_and_normalisation() {
        assert_eq!(
            candidate_urls("https://mycompany.com/a?x=It's"),
            [
                "https://mycompany.com/a?x=It's",
                "https://mycompany.com:443/a?x=It's",
                "https://mycompany.com/a?x=It%27s",
                "https://mycompany.com:443/a?x=It%27s",
            ]
        );
        assert_eq!(
            candidate_urls("http://mycompany.com:1234/a"),
            ["http://mycompany.com:1234/a", "http://mycompany.com/a"]
        );
        let with_credentials = candidate_urls("https://user:pass@example.com:8443/a");
        for expected in [
            "https://user:pass@example.com:8443/a",
            "https://user:pass@example.com/a",
            "https://example.com:8443/a",
            "https://example.com/a",
        ] {
            assert!(
                with_credentials.iter().any(|c| c == expected),
                "{expected} missing from {with_credentials:?}"
            );
        }
        let ipv6 = candidate_urls("wss://[::1]:9000/media");
        assert!(ipv6.iter().any(|c| c == "wss://[::1]/media"), "{ipv6:?}");
        let ipv6_no_port = candidate_urls("wss://[::1]/media");
        assert!(
            ipv6_no_port.iter().any(|c| c == "wss://[::1]:443/media"),
            "{ipv6_no_port:?}"
        );
        // Not a URL at all: only itself, and no panic.
        assert_eq!(candidate_urls("not a url"), ["not a url"]);
        assert_eq!(candidate_urls(""), [""]);
    }

    #[test]
    fn query_param_is_found_only_as_a_whole_key() {
        assert_eq!(
            query_param("https://a/b?x=1&bodySHA256=ab#frag", "bodySHA256"),
            Some("ab")
        );
        assert_eq!(
            query_param("https://a/b?xbodySHA256=ab", "bodySHA256"),
            None
        );
        assert_eq!(query_param("https://a/b", "bodySHA256"), None);
    }

    #[test]
    fn validator_debug_does_not_print_the_token() {
        let text = format!("{:?}", SignatureValidator::new(Secret::new("hunter2")));
        assert!(!text.contains("hunter2"));
    }
}
