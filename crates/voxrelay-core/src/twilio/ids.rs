//! Twilio's resource ids, checked before anything trusts or stores them.
//!
//! A Twilio SID is a two-letter type prefix and 32 hex digits (`CA…` a call, `AC…` an
//! account, `MZ…` a media stream). Twilio's form signature concatenates keys and values
//! without separators, so one captured signature also validates other splits of the same
//! string: checking the shape of every id turns most such re-splits into refusals, and keeps
//! free text out of registries, reports and log lines.

/// Hex digits after the prefix.
const SID_DIGITS: usize = 32;

/// `value` is `prefix` followed by exactly 32 hex digits.
pub fn is_sid(prefix: &str, value: &str) -> bool {
    value.len() == prefix.len() + SID_DIGITS
        && value.starts_with(prefix)
        && value.as_bytes()[prefix.len()..]
            .iter()
            .all(u8::is_ascii_hexdigit)
}

/// A call's id: `CA` and 32 hex digits.
pub fn is_call_sid(value: &str) -> bool {
    is_sid("CA", value)
}

/// An account's id: `AC` and 32 hex digits.
pub fn is_account_sid(value: &str) -> bool {
    is_sid("AC", value)
}

/// A media stream's id: `MZ` and 32 hex digits.
pub fn is_stream_sid(value: &str) -> bool {
    is_sid("MZ", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_the_prefix_and_32_hex_digits() {
        let hex = "0123456789abcdef0123456789ABCDEF";
        assert!(is_call_sid(&format!("CA{hex}")));
        assert!(is_account_sid(&format!("AC{hex}")));
        assert!(is_stream_sid(&format!("MZ{hex}")));
        for bad in [
            String::new(),
            "CA".to_owned(),
            "CA1".to_owned(),
            format!("AC{hex}"),
            format!("ca{hex}"),
            format!("CA{hex}0"),
            format!("CA{}", &hex[1..]),
            format!("CA{}g", &hex[1..]),
            format!("CA{}\n", &hex[1..]),
            // A re-split of `CallSid=CA…` + `CallStatus=ringing`.
            format!("CA{hex}CallStatusringing"),
            format!("CA{}é", &hex[2..]),
        ] {
            assert!(!is_call_sid(&bad), "{bad:?}");
        }
    }
}
