//! ITU-T G.711 μ-law and A-law, bit-exact with the ITU-T Software Tool Library (STL).
//!
//! Every conversion is a table lookup; the tables are computed at compile time from the
//! STL's own algorithm (`g711.c`: `ulaw_compress`/`ulaw_expand`, `alaw_compress`/`alaw_expand`).
//! The common Sun/sox μ-law encoder is *not* the reference: it rounds the negative decision
//! thresholds the other way, so it differs at 127 negative inputs.

/// μ-law code for digital silence.
pub const MULAW_SILENCE: u8 = 0xFF;
/// A-law code for digital silence (positive zero).
pub const ALAW_SILENCE: u8 = 0xD5;

const fn ulaw_expand(code: u8) -> i16 {
    let mantissa_all = !(code as i32);
    let exponent = (mantissa_all >> 4) & 0x07;
    let segment = exponent + 1;
    let mantissa = mantissa_all & 0x0F;
    let step = 4 << segment;
    let magnitude = (0x80 << exponent) + step * mantissa + step / 2 - 4 * 33;
    if code < 0x80 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// STL `ulaw_compress` for one 16-bit sample; only `sample >> 2` matters.
const fn ulaw_compress(sample: i16) -> u8 {
    let s = sample as i32;
    let mut absno = if s < 0 {
        ((!s) >> 2) + 33
    } else {
        (s >> 2) + 33
    };
    if absno > 0x1FFF {
        absno = 0x1FFF;
    }
    let mut i = absno >> 6;
    let mut segno = 1;
    while i != 0 {
        segno += 1;
        i >>= 1;
    }
    let high_nibble = 0x08 - segno;
    let low_nibble = 0x0F - ((absno >> segno) & 0x0F);
    let mut code = (high_nibble << 4) | low_nibble;
    if s >= 0 {
        code |= 0x80;
    }
    code as u8
}

const fn alaw_expand(code: u8) -> i16 {
    let ix = ((code ^ 0x55) & 0x7F) as i32;
    let exponent = ix >> 4;
    let mut mantissa = ix & 0x0F;
    if exponent > 0 {
        mantissa += 16;
    }
    mantissa = (mantissa << 4) + 0x08;
    if exponent > 1 {
        mantissa <<= exponent - 1;
    }
    if code > 127 {
        mantissa as i16
    } else {
        -mantissa as i16
    }
}

/// STL `alaw_compress` for one 16-bit sample; only `sample >> 4` matters.
const fn alaw_compress(sample: i16) -> u8 {
    let s = sample as i32;
    let mut ix = if s < 0 { (!s) >> 4 } else { s >> 4 };
    if ix > 15 {
        let mut exponent = 1;
        while ix > 16 + 15 {
            ix >>= 1;
            exponent += 1;
        }
        ix -= 16;
        ix += exponent << 4;
    }
    if s >= 0 {
        ix |= 0x80;
    }
    (ix ^ 0x55) as u8
}

const MULAW_DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = ulaw_expand(code as u8);
        code += 1;
    }
    table
};

const ALAW_DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = alaw_expand(code as u8);
        code += 1;
    }
    table
};

/// Indexed by `(sample >> 2) + 8192`: the 14 bits the μ-law encoder looks at.
static MULAW_ENCODE: [u8; 16384] = {
    let mut table = [0u8; 16384];
    let mut index = 0;
    while index < 16384 {
        table[index] = ulaw_compress(((index as i32 - 8192) << 2) as i16);
        index += 1;
    }
    table
};

/// Indexed by `(sample >> 4) + 2048`: the 12 bits the A-law encoder looks at.
static ALAW_ENCODE: [u8; 4096] = {
    let mut table = [0u8; 4096];
    let mut index = 0;
    while index < 4096 {
        table[index] = alaw_compress(((index as i32 - 2048) << 4) as i16);
        index += 1;
    }
    table
};

#[inline]
pub fn mulaw_decode(code: u8) -> i16 {
    MULAW_DECODE[code as usize]
}

#[inline]
pub fn mulaw_encode(sample: i16) -> u8 {
    MULAW_ENCODE[((sample >> 2) as i32 + 8192) as usize]
}

#[inline]
pub fn alaw_decode(code: u8) -> i16 {
    ALAW_DECODE[code as usize]
}

#[inline]
pub fn alaw_encode(sample: i16) -> u8 {
    ALAW_ENCODE[((sample >> 4) as i32 + 2048) as usize]
}

/// Decodes μ-law codes into `out`, which must be at least as long as `codes`.
pub fn mulaw_decode_slice(codes: &[u8], out: &mut [i16]) {
    for (sample, &code) in out.iter_mut().zip(codes) {
        *sample = mulaw_decode(code);
    }
}

/// Encodes samples into `out`, which must be at least as long as `samples`.
pub fn mulaw_encode_slice(samples: &[i16], out: &mut [u8]) {
    for (code, &sample) in out.iter_mut().zip(samples) {
        *code = mulaw_encode(sample);
    }
}

/// Decodes A-law codes into `out`, which must be at least as long as `codes`.
pub fn alaw_decode_slice(codes: &[u8], out: &mut [i16]) {
    for (sample, &code) in out.iter_mut().zip(codes) {
        *sample = alaw_decode(code);
    }
}

/// Encodes samples into `out`, which must be at least as long as `samples`.
pub fn alaw_encode_slice(samples: &[i16], out: &mut [u8]) {
    for (code, &sample) in out.iter_mut().zip(samples) {
        *code = alaw_encode(sample);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use sha2::{Digest, Sha256};

    const CONFORMANCE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/g711-conformance.json"
    ));

    fn conformance() -> Value {
        serde_json::from_str(CONFORMANCE).expect("fixture is valid JSON")
    }

    fn fixture_str<'a>(value: &'a Value, pointer: &str) -> &'a str {
        value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("fixture lacks string {pointer}"))
    }

    fn parse_code(text: &str) -> u8 {
        let hex = text.strip_prefix("0x").expect("codes are written 0xNN");
        u8::from_str_radix(hex, 16).expect("code is hex")
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn encode_all_i16(encode: fn(i16) -> u8) -> Vec<u8> {
        (i16::MIN..=i16::MAX).map(encode).collect()
    }

    fn decode_table_le(decode: fn(u8) -> i16) -> Vec<u8> {
        (0..=u8::MAX)
            .flat_map(|code| decode(code).to_le_bytes())
            .collect()
    }

    #[test]
    fn mulaw_decode_vectors_match_the_stl() {
        let fixture = conformance();
        let vectors = fixture
            .pointer("/mulaw/decode")
            .and_then(Value::as_object)
            .expect("mulaw.decode");
        assert!(!vectors.is_empty());
        for (code, expected) in vectors {
            let expected = expected.as_i64().expect("decoded value is a number");
            assert_eq!(
                i64::from(mulaw_decode(parse_code(code))),
                expected,
                "code {code}"
            );
        }
    }

    #[test]
    fn mulaw_encode_vectors_match_the_stl() {
        let fixture = conformance();
        let vectors = fixture
            .pointer("/mulaw/encode_itu")
            .and_then(Value::as_object)
            .expect("mulaw.encode_itu");
        assert!(!vectors.is_empty());
        for (sample, expected) in vectors {
            let sample: i16 = sample.parse().expect("sample is an i16");
            let expected = parse_code(expected.as_str().expect("code is a string"));
            assert_eq!(mulaw_encode(sample), expected, "sample {sample}");
        }
    }

    #[test]
    fn mulaw_full_range_encode_hash_matches_the_stl_not_sox() {
        let fixture = conformance();
        let digest = sha256_hex(&encode_all_i16(mulaw_encode));
        assert_eq!(
            digest,
            fixture_str(&fixture, "/mulaw/sha256_encode_all_i16")
        );
    }

    #[test]
    fn alaw_full_range_encode_hash_matches_the_stl() {
        let fixture = conformance();
        let digest = sha256_hex(&encode_all_i16(alaw_encode));
        assert_eq!(digest, fixture_str(&fixture, "/alaw/sha256_encode_all_i16"));
    }

    #[test]
    fn decode_table_hashes_match_the_stl() {
        let fixture = conformance();
        assert_eq!(
            sha256_hex(&decode_table_le(mulaw_decode)),
            fixture_str(&fixture, "/mulaw/sha256_decode_table")
        );
        assert_eq!(
            sha256_hex(&decode_table_le(alaw_decode)),
            fixture_str(&fixture, "/alaw/sha256_decode_table")
        );
    }

    #[test]
    fn mulaw_codes_round_trip_except_negative_zero() {
        for code in 0..=u8::MAX {
            let expected = if code == 0x7F { MULAW_SILENCE } else { code };
            assert_eq!(
                mulaw_encode(mulaw_decode(code)),
                expected,
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn alaw_codes_round_trip() {
        for code in 0..=u8::MAX {
            assert_eq!(alaw_encode(alaw_decode(code)), code, "code {code:#04x}");
        }
    }

    #[test]
    fn mulaw_max_round_trip_error_matches_fixture() {
        let fixture = conformance();
        let expected = fixture
            .pointer("/mulaw/max_abs_error_roundtrip")
            .and_then(Value::as_i64)
            .expect("max_abs_error_roundtrip");
        let max_error = (i16::MIN..=i16::MAX)
            .map(|sample| (i64::from(mulaw_decode(mulaw_encode(sample))) - i64::from(sample)).abs())
            .max();
        assert_eq!(max_error, Some(expected));
    }

    #[test]
    fn silence_codes_decode_to_zero() {
        assert_eq!(mulaw_decode(MULAW_SILENCE), 0);
        assert_eq!(mulaw_encode(0), MULAW_SILENCE);
        assert_eq!(alaw_encode(0), ALAW_SILENCE);
        assert_eq!(alaw_decode(ALAW_SILENCE), 8);
    }

    #[test]
    fn slice_functions_agree_with_the_scalar_ones() {
        let samples: Vec<i16> = (0..160).map(|n| (n * 409 - 32768) as i16).collect();
        let mut mulaw = [0u8; 160];
        let mut alaw = [0u8; 160];
        mulaw_encode_slice(&samples, &mut mulaw);
        alaw_encode_slice(&samples, &mut alaw);
        let mut mulaw_back = [0i16; 160];
        let mut alaw_back = [0i16; 160];
        mulaw_decode_slice(&mulaw, &mut mulaw_back);
        alaw_decode_slice(&alaw, &mut alaw_back);
        for (n, &sample) in samples.iter().enumerate() {
            assert_eq!(mulaw[n], mulaw_encode(sample));
            assert_eq!(alaw[n], alaw_encode(sample));
            assert_eq!(mulaw_back[n], mulaw_decode(mulaw[n]));
            assert_eq!(alaw_back[n], alaw_decode(alaw[n]));
        }
    }

    #[test]
    fn encoder_table_matches_the_direct_stl_algorithm_for_every_input() {
        for sample in i16::MIN..=i16::MAX {
            assert_eq!(
                mulaw_encode(sample),
                ulaw_compress(sample),
                "mu-law {sample}"
            );
            assert_eq!(alaw_encode(sample), alaw_compress(sample), "A-law {sample}");
        }
    }
}
