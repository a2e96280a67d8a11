//! Lowercase hex, the one spelling of every signature, nonce and stream token here (so a value
//! has exactly one text form and a second spelling cannot slip past a replay check). The `hex`
//! crate does the encoding and decoding; this adds the lowercase rule on input.

/// Exactly `2 * N` lowercase hex digits, decoded; anything else (uppercase included) is `None`.
pub fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || text.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Appends `bytes` as lowercase hex.
pub fn push(out: &mut String, bytes: &[u8]) {
    out.push_str(&hex::encode(bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lowercase_spelling_of_the_exact_length_decodes() {
        assert_eq!(decode::<2>("0aff"), Some([0x0a, 0xff]));
        for bad in ["0AFF", "0aFf", "0af", "0aff0", "0agf", "+aff", ""] {
            assert_eq!(decode::<2>(bad), None, "{bad:?}");
        }
        let mut text = String::from("x");
        push(&mut text, &[0x0a, 0xff]);
        assert_eq!(text, "x0aff");
    }
}
