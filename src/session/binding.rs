//! Stream binding: the per-call token that ties a Media Stream to the webhook that made it.
//!
//! The Media Streams handshake signature covers the URL only, so it proves "probably Twilio",
//! never which call a stream belongs to. The voice webhook therefore puts a token in a TwiML
//! `<Parameter>` ([`STREAM_TOKEN_PARAMETER`]) that Twilio echoes in `start.customParameters`:
//!
//! ```text
//! v2.<expiry, unix seconds>.<64 lowercase hex: HMAC-SHA256(key, len‖CallSid ‖ len‖To ‖ expiry)>
//! ```
//!
//! The MAC covers the call's `CallSid`, its dialled number (`To`) and the expiry, each
//! length-prefixed (4-byte big-endian lengths, the expiry as 8 big-endian bytes), so no two
//! different triples share a MAC input. A token lives [`TOKEN_LIFETIME`] (Twilio opens the
//! stream within seconds of fetching the TwiML). The key is derived from the Twilio auth token
//! (a secret every machine of a deployment already shares, so a stream landing on another
//! machine still verifies) under a label used for nothing else.
//!
//! A stream is **bound** only if its token verifies for its own `callSid` and `To`, has not
//! expired, and it is the first stream to present it: [`StreamTokens::bind`] remembers claimed
//! calls ([`ClaimedCalls`]) until their token has expired, so a captured token is good for one
//! stream at most. The claim memory is per process: a second stream with the same token that
//! reaches another machine of the deployment is not caught there (Fly replays streams to the
//! machine named in their URL, so in practice they meet the same memory).
//!
//! Invariants: the key never leaves this type (its `Debug` is redacted); MACs are compared in
//! constant time; the claim memory is bounded ([`DEFAULT_CLAIM_CAPACITY`]) and never forgets a
//! claim while its token could still be accepted (see [`ClaimedCalls`]); checking a token costs
//! O(its length) and nothing a peer sends sizes a loop or a buffer.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The `<Parameter>` name carrying the token.
pub const STREAM_TOKEN_PARAMETER: &str = "VoxrelayToken";
/// How long a token issued by the webhook may be presented by a `start`. Twilio opens the
/// stream within a few seconds of fetching the TwiML; three minutes leaves room for a slow
/// network and clocks a little apart between machines.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(180);
/// Calls remembered as claimed at most: 65 536 claims in one token lifetime is ~364 new calls
/// per second sustained, far beyond what one bridge answers; each costs ~60 bytes.
pub const DEFAULT_CLAIM_CAPACITY: usize = 1 << 16;

/// Domain separation: this key signs stream tokens and nothing else. (`v1`, a MAC over the
/// CallSid alone without an expiry, is no longer accepted: its key was derived under another
/// label.)
const KEY_LABEL: &[u8] = b"voxrelay stream token v2";
const TOKEN_PREFIX: &str = "v2.";
const MAC_HEX_LEN: usize = 64;
/// `u64::MAX` has 20 decimal digits.
const MAX_EXPIRY_DIGITS: usize = 20;
/// Longer than any token we issue: refused before any parsing.
const MAX_TOKEN_LEN: usize = TOKEN_PREFIX.len() + MAX_EXPIRY_DIGITS + 1 + MAC_HEX_LEN;

/// What a `start`'s token says about the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The token verifies for this call and number, is unexpired, and this stream is the first
    /// to present it: the TwiML came from our webhook and the stream is that call's.
    Bound,
    /// No token: TwiML from elsewhere (a TwiML Bin, the operator's own app). Refused unless
    /// `VOXRELAY_REQUIRE_STREAM_TOKEN=0`, and then never given a tenant.
    Unbound,
    /// A token that is not ours for this `CallSid` and `To` (or not a token at all).
    Mismatch,
    /// A genuine token past its expiry.
    Expired,
    /// A genuine token another stream already presented.
    AlreadyClaimed,
}

impl Binding {
    /// Refused whatever `VOXRELAY_REQUIRE_STREAM_TOKEN` says.
    pub fn is_refused(self) -> bool {
        matches!(
            self,
            Binding::Mismatch | Binding::Expired | Binding::AlreadyClaimed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Binding::Bound => "bound",
            Binding::Unbound => "unbound",
            Binding::Mismatch => "mismatch",
            Binding::Expired => "expired",
            Binding::AlreadyClaimed => "already_claimed",
        }
    }
}

/// Issues and checks stream tokens, and remembers which calls a stream has claimed. Cheap to
/// clone; clones share the claim memory.
#[derive(Clone)]
pub struct StreamTokens {
    key: [u8; 32],
    claims: Arc<Mutex<ClaimedCalls>>,
}

impl fmt::Debug for StreamTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamTokens(<redacted>)")
    }
}

impl StreamTokens {
    /// Derives the token key from the Twilio auth token.
    pub fn from_auth_token(auth_token: &Secret) -> Self {
        Self::with_claim_capacity(auth_token, DEFAULT_CLAIM_CAPACITY)
    }

    /// As [`StreamTokens::from_auth_token`], remembering at most `capacity` claims.
    pub fn with_claim_capacity(auth_token: &Secret, capacity: usize) -> Self {
        let mut mac = HmacSha256::new_from_slice(auth_token.expose().as_bytes())
            .expect("HMAC accepts keys of any length");
        mac.update(KEY_LABEL);
        Self {
            key: mac.finalize().into_bytes().into(),
            claims: Arc::new(Mutex::new(ClaimedCalls::new(capacity))),
        }
    }

    /// The token for one call, valid until `now_unix + TOKEN_LIFETIME`.
    pub fn issue(&self, now_unix: u64, call_sid: &str, to: &str) -> String {
        let expiry = now_unix.saturating_add(TOKEN_LIFETIME.as_secs());
        let mut token = String::with_capacity(MAX_TOKEN_LEN);
        token.push_str(TOKEN_PREFIX);
        token.push_str(&expiry.to_string());
        token.push('.');
        voxrelay_core::lowerhex::push(&mut token, &self.mac(call_sid, to, expiry));
        token
    }

    /// [`StreamTokens::issue`] at the wall clock's time.
    pub fn issue_now(&self, call_sid: &str, to: &str) -> String {
        self.issue(unix_now(), call_sid, to)
    }

    /// Checks a `start`'s token (if any) against its `callSid` and `To` parameter, without
    /// claiming anything. `Ok(expiry)` for a genuine, unexpired token.
    pub fn verify(
        &self,
        now_unix: u64,
        call_sid: &str,
        to: &str,
        token: Option<&str>,
    ) -> Result<u64, Binding> {
        let token = token.ok_or(Binding::Unbound)?;
        let (expiry, received) = parse_token(token).ok_or(Binding::Mismatch)?;
        let expected = self.mac(call_sid, to, expiry);
        if !bool::from(expected.ct_eq(&received)) {
            return Err(Binding::Mismatch);
        }
        if now_unix > expiry {
            return Err(Binding::Expired);
        }
        Ok(expiry)
    }

    /// Checks a `start`'s token and, when it verifies, claims its call for this stream: only
    /// the first stream presenting a token is [`Binding::Bound`].
    pub fn bind(&self, now_unix: u64, call_sid: &str, to: &str, token: Option<&str>) -> Binding {
        let expiry = match self.verify(now_unix, call_sid, to, token) {
            Ok(expiry) => expiry,
            Err(binding) => return binding,
        };
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        match claims.claim(now_unix, call_sid, expiry) {
            Ok(()) => Binding::Bound,
            Err(ClaimRefused::AlreadyClaimed) => Binding::AlreadyClaimed,
            Err(ClaimRefused::Forgotten) => Binding::Expired,
        }
    }

    /// [`StreamTokens::bind`] at the wall clock's time.
    pub fn bind_now(&self, call_sid: &str, to: &str, token: Option<&str>) -> Binding {
        self.bind(unix_now(), call_sid, to, token)
    }

    /// Calls remembered as claimed now (the tests' view of the claim memory's bound).
    #[cfg(test)]
    fn claimed_calls(&self) -> usize {
        self.claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn mac(&self, call_sid: &str, to: &str, expiry: u64) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        for field in [call_sid, to] {
            // Lengths fit: both come out of a message capped far below 4 GiB.
            let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
            mac.update(&length.to_be_bytes());
            mac.update(field.as_bytes());
        }
        mac.update(&expiry.to_be_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// `v2.<canonical decimal>.<64 lowercase hex>` → (expiry, MAC).
fn parse_token(token: &str) -> Option<(u64, [u8; 32])> {
    if token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let (expiry, mac_hex) = token.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
    let digits = expiry.as_bytes();
    let canonical = !digits.is_empty()
        && digits.len() <= MAX_EXPIRY_DIGITS
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || digits.len() == 1);
    if !canonical || mac_hex.len() != MAC_HEX_LEN {
        return None;
    }
    let expiry = expiry.parse().ok()?;
    Some((expiry, voxrelay_core::lowerhex::decode::<32>(mac_hex)?))
}

fn unix_now() -> u64 {
    voxrelay_core::time::unix_secs(SystemTime::now())
}

/// Why a claim was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Another stream claimed this call already.
    AlreadyClaimed,
    /// The token's expiry is at or below the floor: the memory may have forgotten a claim of
    /// it, so it cannot vouch that this stream is the first.
    Forgotten,
}

/// Calls already claimed by a stream, each until its token's expiry.
///
/// Policy (the same as the control plane's nonce cache): an entry is kept until its token has
/// expired, since until then a second stream could present the token. At most `capacity`
/// entries are kept; when a new claim would exceed that, the entry expiring first is evicted and
/// the floor rises to its expiry, and from then on any token expiring at or before the floor is
/// refused ([`ClaimRefused::Forgotten`]). Forgetting a claim therefore always comes with
/// refusing every token that could repeat it: overload costs the oldest tokens their
/// acceptance, never one-stream-per-token. Only holders of a genuine token (issued by our own,
/// signature-checked webhook) can add entries. Calls are remembered by a 16-byte digest of the
/// `CallSid`, so an entry's size does not depend on what a peer sent.
#[derive(Debug)]
pub struct ClaimedCalls {
    claimed: HashSet<[u8; 16]>,
    by_expiry: BTreeSet<(u64, [u8; 16])>,
    capacity: usize,
    floor: Option<u64>,
}

impl ClaimedCalls {
    /// A memory of at most `capacity` claims (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            claimed: HashSet::new(),
            by_expiry: BTreeSet::new(),
            capacity: capacity.max(1),
            floor: None,
        }
    }

    /// Claims `call_sid`, whose token expires at `expiry`.
    pub fn claim(
        &mut self,
        now_unix: u64,
        call_sid: &str,
        expiry: u64,
    ) -> Result<(), ClaimRefused> {
        self.expire(now_unix);
        if self.floor.is_some_and(|floor| expiry <= floor) {
            return Err(ClaimRefused::Forgotten);
        }
        let digest = call_digest(call_sid);
        if self.claimed.contains(&digest) {
            return Err(ClaimRefused::AlreadyClaimed);
        }
        self.claimed.insert(digest);
        self.by_expiry.insert((expiry, digest));
        let mut evicted_self = false;
        while self.claimed.len() > self.capacity {
            let Some(&(oldest_expiry, oldest)) = self.by_expiry.first() else {
                break;
            };
            evicted_self |= oldest == digest;
            self.forget(oldest_expiry, oldest);
        }
        if evicted_self {
            // Its own expiry is now the floor: refused as any token the memory cannot vouch for.
            Err(ClaimRefused::Forgotten)
        } else {
            Ok(())
        }
    }

    pub fn len(&self) -> usize {
        self.claimed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claimed.is_empty()
    }

    /// Entries whose token has expired go: their token is refused as expired anyway. The floor
    /// still rises to their expiry, which refuses nothing the clock does not refuse already and
    /// keeps a clock stepped back from reviving them.
    fn expire(&mut self, now_unix: u64) {
        while let Some(&(expiry, digest)) = self.by_expiry.first() {
            if expiry >= now_unix {
                break;
            }
            self.forget(expiry, digest);
        }
    }

    fn forget(&mut self, expiry: u64, digest: [u8; 16]) {
        self.by_expiry.remove(&(expiry, digest));
        self.claimed.remove(&digest);
        self.floor = Some(self.floor.map_or(expiry, |floor| floor.max(expiry)));
    }
}

fn call_digest(call_sid: &str) -> [u8; 16] {
    let digest = Sha256::digest(call_sid.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Lcg;

    const NOW: u64 = 1_750_000_000;
    const SID: &str = "CA0123456789abcdef0123456789abcdef";
    const TO: &str = "+15550100001";

    fn tokens() -> StreamTokens {
        StreamTokens::from_auth_token(&Secret::new("auth-token"))
    }

    #[test]
    fn a_token_has_the_documented_shape_and_lifetime() {
        let token = tokens().issue(NOW, SID, TO);
        let expiry = NOW + TOKEN_LIFETIME.as_secs();
        let prefix = format!("v2.{expiry}.");
        assert!(token.starts_with(&prefix), "{token}");
        let mac = &token[prefix.len()..];
        assert_eq!(mac.len(), 64);
        assert!(
            mac.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(token.len() <= MAX_TOKEN_LEN);
    }

    #[test]
    fn a_token_binds_its_call_its_number_and_its_expiry() {
        let tokens = tokens();
        let token = tokens.issue(NOW, SID, TO);
        let expiry = NOW + TOKEN_LIFETIME.as_secs();
        assert_eq!(tokens.verify(NOW + 5, SID, TO, Some(&token)), Ok(expiry));
        let other_sid = "CA0123456789abcdef0123456789abcdee";
        assert_eq!(
            tokens.verify(NOW, other_sid, TO, Some(&token)),
            Err(Binding::Mismatch)
        );
        assert_eq!(
            tokens.verify(NOW, SID, "+15550100002", Some(&token)),
            Err(Binding::Mismatch)
        );
        // Moving the expiry breaks the MAC.
        let later = token.replacen(&expiry.to_string(), &(expiry + 600).to_string(), 1);
        assert_eq!(
            tokens.verify(NOW, SID, TO, Some(&later)),
            Err(Binding::Mismatch)
        );
        // Expired: exactly at the expiry is still good, one second after is not.
        assert_eq!(tokens.verify(expiry, SID, TO, Some(&token)), Ok(expiry));
        assert_eq!(
            tokens.verify(expiry + 1, SID, TO, Some(&token)),
            Err(Binding::Expired)
        );
        assert_eq!(tokens.verify(NOW, SID, TO, None), Err(Binding::Unbound));
    }

    #[test]
    fn fields_cannot_be_shifted_between_call_sid_and_to() {
        let tokens = tokens();
        let token = tokens.issue(NOW, "CA1", "23");
        assert_eq!(
            tokens.verify(NOW, "CA12", "3", Some(&token)),
            Err(Binding::Mismatch)
        );
        assert_eq!(
            tokens.verify(NOW, "CA", "123", Some(&token)),
            Err(Binding::Mismatch)
        );
    }

    #[test]
    fn malformed_tokens_are_mismatches() {
        let tokens = tokens();
        let good = tokens.issue(NOW, SID, TO);
        let upper = good.to_uppercase().replacen("V2", "v2", 1);
        let padded = good.replacen("v2.", "v2.0", 1);
        let v1_shape = good[good.len() - 64..].to_owned();
        for bad in [
            "",
            "v2",
            "v2..",
            "v3.1.00",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &upper,
            &padded,
            &v1_shape,
            &"v2.1.".repeat(1000),
        ] {
            assert_eq!(
                tokens.verify(NOW, SID, TO, Some(bad)),
                Err(Binding::Mismatch),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn any_string_is_checked_without_panicking_and_only_ours_verify() {
        let tokens = tokens();
        let good = tokens.issue(NOW, SID, TO);
        let alphabet: Vec<char> = "v2.0123456789abcdefABCDEF-é\u{0}".chars().collect();
        let mut rng = Lcg(5);
        for _ in 0..20_000 {
            let candidate: String = if rng.below(4) == 0 {
                // Mutations of a genuine token: one character changed.
                let mut chars: Vec<char> = good.chars().collect();
                let at = rng.below(chars.len() as u64) as usize;
                chars[at] = alphabet[rng.below(alphabet.len() as u64) as usize];
                chars.into_iter().collect()
            } else {
                (0..rng.below(120))
                    .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                    .collect()
            };
            let verdict = tokens.verify(NOW, SID, TO, Some(&candidate));
            if candidate == good {
                assert!(verdict.is_ok());
            } else {
                assert_eq!(verdict, Err(Binding::Mismatch), "{candidate:?}");
            }
        }
    }

    #[test]
    fn machines_sharing_the_auth_token_agree_and_others_do_not() {
        let here = tokens();
        let there = tokens();
        let other = StreamTokens::from_auth_token(&Secret::new("other-token"));
        let token = here.issue(NOW, SID, TO);
        assert!(there.verify(NOW, SID, TO, Some(&token)).is_ok());
        assert_eq!(
            other.verify(NOW, SID, TO, Some(&token)),
            Err(Binding::Mismatch)
        );
        assert!(!format!("{here:?}").contains(&token));
    }

    #[test]
    fn only_the_first_stream_presenting_a_token_is_bound() {
        let tokens = tokens();
        let token = tokens.issue(NOW, SID, TO);
        assert_eq!(tokens.bind(NOW + 1, SID, TO, Some(&token)), Binding::Bound);
        assert_eq!(
            tokens.bind(NOW + 2, SID, TO, Some(&token)),
            Binding::AlreadyClaimed
        );
        // A clone shares the memory (every call of a bridge sees one).
        assert_eq!(
            tokens.clone().bind(NOW + 3, SID, TO, Some(&token)),
            Binding::AlreadyClaimed
        );
        assert_eq!(tokens.claimed_calls(), 1);
        // Refusals claim nothing.
        let other = "CA0123456789abcdef0123456789abcdee";
        assert_eq!(tokens.bind(NOW, other, TO, Some(&token)), Binding::Mismatch);
        assert_eq!(tokens.bind(NOW, other, TO, None), Binding::Unbound);
        assert_eq!(tokens.claimed_calls(), 1);
        assert!(Binding::AlreadyClaimed.is_refused() && !Binding::Unbound.is_refused());
    }

    #[test]
    fn claims_are_remembered_until_their_token_expires_then_dropped() {
        let tokens = tokens();
        let token = tokens.issue(NOW, SID, TO);
        let expiry = NOW + TOKEN_LIFETIME.as_secs();
        assert_eq!(tokens.bind(NOW, SID, TO, Some(&token)), Binding::Bound);
        assert_eq!(
            tokens.bind(expiry, SID, TO, Some(&token)),
            Binding::AlreadyClaimed
        );
        // After the expiry the token is refused as expired, and its entry can go.
        assert_eq!(
            tokens.bind(expiry + 1, SID, TO, Some(&token)),
            Binding::Expired
        );
        let next = tokens.issue(expiry + 1, "CA2", TO);
        assert_eq!(
            tokens.bind(expiry + 1, "CA2", TO, Some(&next)),
            Binding::Bound
        );
        assert_eq!(tokens.claimed_calls(), 1, "the expired claim was dropped");
    }

    #[test]
    fn a_full_memory_refuses_the_tokens_it_can_no_longer_vouch_for() {
        let mut claims = ClaimedCalls::new(2);
        claims.claim(NOW, "CA1", NOW + 10).unwrap();
        claims.claim(NOW, "CA2", NOW + 20).unwrap();
        // A third evicts the claim expiring first (CA1) and raises the floor to its expiry.
        claims.claim(NOW, "CA3", NOW + 30).unwrap();
        assert_eq!(claims.len(), 2);
        // CA1 was forgotten, but its token (expiry NOW + 10) is at the floor: refused.
        assert_eq!(
            claims.claim(NOW, "CA1", NOW + 10),
            Err(ClaimRefused::Forgotten)
        );
        assert_eq!(
            claims.claim(NOW, "CA2", NOW + 20),
            Err(ClaimRefused::AlreadyClaimed)
        );
        // A newcomer that would itself be the first evicted is refused the same way.
        assert_eq!(
            claims.claim(NOW, "CA4", NOW + 15),
            Err(ClaimRefused::Forgotten)
        );
        assert_eq!(claims.len(), 2);
    }

    #[test]
    fn any_sequence_of_claims_stays_within_capacity_and_never_binds_twice() {
        let mut rng = Lcg(7);
        let capacity = 16;
        let mut claims = ClaimedCalls::new(capacity);
        let mut bound_at: std::collections::HashMap<u64, u64> = Default::default();
        let mut tokens_bound = HashSet::new();
        let mut now = NOW;
        for _ in 0..20_000 {
            now += rng.below(3);
            let sid = rng.below(64);
            let expiry = now + rng.below(40);
            let call_sid = format!("CA{sid}");
            if claims.claim(now, &call_sid, expiry).is_ok() {
                // One stream per token, always.
                assert!(tokens_bound.insert((sid, expiry)), "a token bound twice");
                if let Some(&earlier) = bound_at.get(&sid) {
                    // A second bind of the same call (with another token) only once the first
                    // token has expired, or, under overload, once it is refused by the floor.
                    assert!(
                        earlier < now || claims.floor.is_some_and(|floor| floor >= earlier),
                        "CA{sid} bound twice"
                    );
                }
                bound_at.insert(sid, expiry);
            }
            assert!(claims.len() <= capacity);
            assert_eq!(claims.claimed.len(), claims.by_expiry.len());
        }
    }
}
