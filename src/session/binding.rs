//! Stream binding: the per-call token that ties a Media Stream to the webhook that made it.
//!
//! The voice webhook puts `HMAC-SHA256(key, CallSid)` in a TwiML `<Parameter>`
//! ([`STREAM_TOKEN_PARAMETER`]); Twilio echoes it in `start.customParameters`. A `start` whose
//! token does not match its own `callSid` is refused, so a stream cannot claim another call's
//! tenant or pre-warmed session. The key is derived from the Twilio auth token (a secret
//! every machine of a deployment already shares), so a stream landing on another machine
//! still verifies. Invariants: the key never leaves this type (its `Debug` is redacted); tokens
//! are compared in constant time.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The `<Parameter>` name carrying the token.
pub const STREAM_TOKEN_PARAMETER: &str = "VoxrelayToken";
/// Domain separation: this key signs stream tokens and nothing else.
const KEY_LABEL: &[u8] = b"voxrelay stream token v1";

/// What a `start`'s token says about the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The token matches the call: the TwiML came from our webhook.
    Bound,
    /// No token: TwiML from elsewhere (a TwiML Bin, the operator's own app).
    Unbound,
    /// A token that does not match the call: refused.
    Mismatch,
}

#[derive(Clone)]
pub struct StreamTokens {
    key: [u8; 32],
}

impl fmt::Debug for StreamTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamTokens(<redacted>)")
    }
}

impl StreamTokens {
    /// Derives the token key from the Twilio auth token.
    pub fn from_auth_token(auth_token: &Secret) -> Self {
        let mut mac = HmacSha256::new_from_slice(auth_token.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(KEY_LABEL);
        Self {
            key: mac.finalize().into_bytes().into(),
        }
    }

    /// The token for one call: 64 lowercase hex characters.
    pub fn issue(&self, call_sid: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(call_sid.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut hex = String::with_capacity(64);
        for byte in digest {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    }

    /// Checks a `start`'s token (if any) against its `callSid`.
    pub fn check(&self, call_sid: &str, token: Option<&str>) -> Binding {
        let Some(token) = token else {
            return Binding::Unbound;
        };
        let expected = self.issue(call_sid);
        if expected.as_bytes().ct_eq(token.as_bytes()).into() {
            Binding::Bound
        } else {
            Binding::Mismatch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_binds_only_its_own_call() {
        let tokens = StreamTokens::from_auth_token(&Secret::new("auth-token"));
        let token = tokens.issue("CA1");
        assert_eq!(token.len(), 64);
        assert_eq!(tokens.check("CA1", Some(&token)), Binding::Bound);
        assert_eq!(tokens.check("CA2", Some(&token)), Binding::Mismatch);
        assert_eq!(tokens.check("CA1", Some("")), Binding::Mismatch);
        assert_eq!(tokens.check("CA1", Some(&token[..63])), Binding::Mismatch);
        assert_eq!(tokens.check("CA1", None), Binding::Unbound);
    }

    #[test]
    fn machines_sharing_the_auth_token_agree_and_others_do_not() {
        let here = StreamTokens::from_auth_token(&Secret::new("auth-token"));
        let there = StreamTokens::from_auth_token(&Secret::new("auth-token"));
        let other = StreamTokens::from_auth_token(&Secret::new("other-token"));
        let token = here.issue("CA1");
        assert_eq!(there.check("CA1", Some(&token)), Binding::Bound);
        assert_eq!(other.check("CA1", Some(&token)), Binding::Mismatch);
        assert!(!format!("{here:?}").contains(&token));
    }
}
