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
    let mut absno = if s < 0 { ((!s) >> 2) + 33 } else { (s >> 2) + 33 };
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

    #[test]
    fn encoder_table_matches_the_direct_stl_algorithm_for_every_input() {
        for sample in i16::MIN..=i16::MAX {
            assert_eq!(mulaw_encode(sample), ulaw_compress(sample), "mu-law {sample}");
            assert_eq!(alaw_encode(sample), alaw_compress(sample), "A-law {sample}");
        }
    }
}
